"""Dataset commands: data voc (convert a VOCdevkit), data deepforest (rebuild the embedded tree data),
data fashion-det (build the offline detection benchmark)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sos_detect.cli.arguments import add_options, command, typed
from sos_detect.cli.paths import fresh_build
from sos_detect.core.options import Option, at_least

FORCE_HELP = (
    "replace what an earlier build wrote in a non-empty --out (refused without it), swapped in once the new build "
    "is complete; other files there are kept"
)
WORKERS = Option("workers", int, None, "processes (default: all cores)", *at_least(1), optional=True)


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    df = command(
        dsub,
        "deepforest",
        cmd_deepforest,
        help="rebuild the embedded tree data from the deepforest wheel",
        required=["src"],
    )
    df.add_argument("--src", default=None, help="deepforest-2.1.0-py3-none-any.whl or its unpacked data folder")
    df.add_argument("--out", default="data/deepforest", help="output folder")
    vo = command(
        dsub,
        "voc",
        cmd_voc,
        help="convert an extracted VOCdevkit to the Ultralytics layout (offline)",
        description="train = VOC2007 trainval + VOC2012 trainval, val = VOC2007 test; difficult objects are kept "
        "out of the labels and recorded in difficult_{split}.json. --out datasets/voc is what --data voc.yaml finds.",
        required=["root"],
    )
    vo.add_argument("--root", default=None, help="the VOCdevkit folder holding VOC2007/ and/or VOC2012/")
    vo.add_argument("--out", default="datasets/voc", help="output folder")
    add_options(vo, (WORKERS,))
    fd = command(
        dsub,
        "fashion-det",
        cmd_fashion_det,
        help="build the fashion-det benchmark: Fashion-MNIST items on real photographs, exact boxes, bit for bit",
        description="Composes detection images from Fashion-MNIST items (10 classes) pasted on crops of real "
        "photographs that ship with the repository and scikit-learn; the same options give the same bytes.",
    )
    fd.add_argument("--train", type=int, default=3000, help="training images (default 3000)")
    fd.add_argument("--val", type=int, default=1000, help="validation images (default 1000)")
    fd.add_argument("--imgsz", default="192,256", help="image sides drawn from MIN,MAX px (default 192,256)")
    fd.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    fd.add_argument("--root", default=None, help="Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist)")
    fd.add_argument("--out", default="datasets/fashion-det", help="output folder (default datasets/fashion-det)")
    for p in (df, vo, fd):
        p.add_argument("--force", action="store_true", help=FORCE_HELP)


def cmd_voc(a: argparse.Namespace) -> int:
    from sos_detect.detect.voc import convert_voc, write_voc_yaml

    with fresh_build(a.out, typed(a, "out"), a.force) as work:
        summary = convert_voc(a.root, work, a.workers)
        write_voc_yaml(work, Path(a.out).resolve())
    print(summary.format())
    print(f"data YAML: {Path(a.out).resolve() / 'voc.yaml'}")
    return 0


def cmd_deepforest(a: argparse.Namespace) -> int:
    from sos_detect.detect.embedded import build_embedded

    with fresh_build(a.out, typed(a, "out"), a.force) as work:
        counts = build_embedded(a.src, work)
    print(", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_fashion_det(a: argparse.Namespace) -> int:
    from sos_detect.detect.synthetic import YAML_NAME, build_fashion_det, dataset_digest, spec_from_args

    spec = spec_from_args(a.train, a.val, a.imgsz, a.seed)
    with fresh_build(a.out, typed(a, "out"), a.force) as work:
        counts = build_fashion_det(work, spec, a.root)
    print(", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"data YAML: {Path(a.out).resolve() / YAML_NAME}\nsha256 {dataset_digest(a.out)}")
    return 0
