"""The README as a newcomer follows it: every command and Python snippet it shows is run (data-free ones for real, at
tiny sizes where the README's run is long; data-needing ones up to their first one-line error), and every `--help`
is checked against what the command does."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
from conftest import cli_main, snapshot

from sos_detect.cli import build_parser, main
from sos_detect.cli.arguments import apply_key_values, parse
from sos_detect.detect.embedded import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
FASHION_IDX = Path("/usr/share/datasets/fashion-mnist")
TINY_TRAIN = ["--epochs", "2", "--imgsz", "64"]  # the main job in seconds (a shift with --sos-start 0)


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.S | re.M)


def readme_commands() -> list[str]:
    """Every command line of the README's bash blocks: continuations joined, comments and spacing dropped."""
    out = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())
            if line:
                out.append(line)
    return out


def inline_commands() -> list[str]:
    """Every `sos-detect …` in backticks in the README's text (also across a line break)."""
    return [" ".join(c.split()) for c in re.findall(r"`(sos-detect [^`]+)`", README)]


# What each README command does here, and how it is run. "run": for real, with these arguments added (the README's
# run is long); "done": run by the `work` fixture, which wrote this file; "error": its data is not here, so it must
# stop with one line containing the text, writing nothing; "skip": not a command to run inside the test suite.
COMMANDS: dict[str, tuple[str, object]] = {
    'pip install -e ".[dev]"': ("skip", "installs the package; CI runs it before the tests"),
    "python -m pytest": ("skip", "the test suite, this test included"),
    "sos-detect train": ("done", "runs/sos/train/weights/best.pt"),  # by the `work` fixture, at tiny size
    "sos-detect data voc --root /path/to/VOCdevkit --out datasets/voc": (
        "error",
        "/path/to/VOCdevkit: VOCdevkit folder not found",
    ),
    "sos-detect train --cfg yolov5s.yaml --data voc.yaml --weights yolov5su.pt --epochs 100 --imgsz 640 --batch 64 "
    "--device 0 --optimizer SGD momentum=0.9": ("error", "--"),
    "sos-detect val --weights runs/sos/train/weights/best.pt --voc07 --coco": ("run", []),  # the main job's best.pt
    "sos-detect classify train --data digits --optimizer sam --sos --epochs 3": ("run", []),
    "sos-detect classify train --resume": ("error", "no unfinished run"),  # the run above finished
    "sos-detect reproduce classify --preset paper --root CIFAR --sos-batch 200,300,400 --schemes sgd,sgd+sos": (
        "error",
        "CIFAR",
    ),
    "apt-get install -y dataset-fashion-mnist": ("skip", "a system package"),
    "sos-detect data fashion-det": ("run", ["--train", "6", "--val", "3"]) if FASHION_IDX.is_dir() else ("error", ""),
    "sos-detect reproduce ab --data my.yaml --weights my_start.pt --seeds 0,1,2,3,4 --arm base:sos=False --arm "
    "guarded-1e-3:sos_tau=1e-3 --arm paper-b32:sos_mode=paper,sos_rows=32 --opt epochs=20 --opt imgsz=640 --opt "
    "batch=16 --out runs/ab/mine": ("error", "my.yaml"),
    "sos-detect compare runs/ab/mine/runs/yolov5n_s0_base runs/ab/mine/runs/yolov5n_s0_guarded-1e-3": (
        "error",
        "runs/ab/mine/runs/yolov5n_s0_base",
    ),
    "sos-detect reproduce ab --preset synth-scratch --out benchmarks/results/fashion_det_scratch": ("error", ""),
    "sos-detect reproduce ab --preset synth-finetune --out benchmarks/results/fashion_det_finetune": ("error", ""),
    "sos-detect reproduce ab --preset synth-scratch-gpu --out benchmarks/results/fashion_det_scratch_gpu": (
        "error",
        "",
    ),
    "sos-detect reproduce ab --preset synth-finetune-ablation --jobs 2 --out benchmarks/results/fashion_det_ablation": (
        "error",
        "",
    ),
    "sos-detect reproduce ab --preset synth-overfit --jobs 2 --out benchmarks/results/fashion_det_overfit": (
        "error",
        "",
    ),
}


def as_run(command: str) -> str:
    """The README's line as typed into one shell: a CPU pin (`taskset -c N`) and a trailing `&` removed."""
    return re.sub(r"^taskset -c \d+ ", "", command).removesuffix(" &")


def argv(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[0] == "sos-detect", command
    return words[1:]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The working folder a newcomer has after the main job: `sos-detect train`, then `sos-detect train --no-sos`
    (runs/sos/train and runs/sos/train-2), both at tiny size."""
    folder = tmp_path_factory.mktemp("readme")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        assert main(["train", *TINY_TRAIN, "--sos-start", "0"]) == 0
        assert main(["train", "--no-sos", *TINY_TRAIN]) == 0  # SOS options with --no-sos are refused
    return folder


def test_every_readme_command_is_covered():
    assert set(map(as_run, readme_commands())) == set(COMMANDS)


@pytest.mark.slow  # the `work` fixture trains twice; some commands run for real
@pytest.mark.parametrize("command", list(COMMANDS))
def test_readme_command(command, work, monkeypatch, capsys):
    how, arg = COMMANDS[command]
    if how == "skip":
        pytest.skip(str(arg))
    monkeypatch.chdir(work)
    if how == "done":
        assert (work / str(arg)).is_file()
        return
    if how == "run":
        code, out, err = cli_main(capsys, *argv(command), *arg)
        assert code == 0, err[-2000:]
        return
    before = snapshot(work)
    code, out, err = cli_main(capsys, *argv(command))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and arg in lines[0], (code, err[-2000:])
    assert snapshot(work) == before  # nothing written


@pytest.mark.slow  # the `work` fixture trains
def test_main_job_folders_and_plots_match_help_and_readme(work, capsys):
    """`--name` help's train-2 is the second run's folder; sos_head_norm.png only for the run that shifted; the
    final validation and `val --weights best.pt` print one mAP (README)."""
    assert "train-2" in _help(["train"])
    runs = work / "runs" / "sos"
    assert "sos: true" in (runs / "train" / "sos_args.yaml").read_text()
    assert "sos: false" in (runs / "train-2" / "sos_args.yaml").read_text()  # the second run, --no-sos
    assert (runs / "train" / "sos_head_norm.png").is_file()
    assert not (runs / "train-2" / "sos_head_norm.png").exists()


@pytest.mark.slow  # the `work` fixture trains
def test_compare_labels_what_differs_and_never_overwrites(work, monkeypatch, capsys):
    """The legend says what differs between the runs (their args.yaml), the PNG goes under runs/compare and a second
    compare keeps the first one's file."""
    monkeypatch.chdir(work)
    outputs = []
    for _ in range(2):
        code, out, err = cli_main(capsys, "compare", "runs/sos/train", "runs/sos/train-2")
        assert code == 0, err
        outputs.append(out)
    assert "train: sos=True" in outputs[0] and "train-2: sos=False" in outputs[0]
    assert outputs[0].splitlines()[-1] == "written: runs/compare/compare.png"
    assert (
        outputs[1].splitlines()[-1]
        == "written: runs/compare/compare-2.png (runs/compare/compare.png exists and is kept)"
    )
    assert sorted(p.name for p in (work / "runs" / "compare").iterdir()) == ["compare-2.png", "compare.png"]


def test_inline_commands_parse():
    """Every `sos-detect …` in the README's text names a command whose flags and KEY=VALUE arguments parse (`a/b`
    names two commands; … is a placeholder)."""
    parser = build_parser()
    for text in inline_commands():
        words = [w for w in argv(text) if w != "…"]
        two = len(words) > 1 and not words[1].startswith("-") and "=" not in words[1]  # `classify train/shift`
        variants = [[words[0], alt, *words[2:]] for alt in words[1].split("/")] if two else [words]
        for command in variants:
            args, extras = parse(parser, command)
            apply_key_values(args, extras)  # KEY=VALUE as Ultralytics reads them; an unknown key raises


@pytest.mark.slow  # trains
def test_readme_python_snippets(tmp_path, monkeypatch, capsys):
    """Each snippet as shown, the YOLO training at 1 epoch and 64 px into the test's folder."""
    monkeypatch.chdir(tmp_path)
    snippets = readme_blocks("python")
    assert len(snippets) == 2
    exec(compile(snippets[0], "README snippet 1", "exec"), {})
    assert "norm ratio" in capsys.readouterr().out
    # project: under pytest, Ultralytics puts relative runs in its own package folder
    tiny = snippets[1].replace("epochs=30, imgsz=320", f"epochs=1, imgsz=64, project={str(tmp_path)!r}")
    assert tiny != snippets[1]
    exec(compile(tiny, "README snippet 2", "exec"), {})
    assert (tmp_path / "train" / "weights" / "best.pt").is_file()


@pytest.mark.slow  # trains
def test_readme_inline_runs_at_tiny_size(tmp_path, monkeypatch, capsys):
    """`reproduce sensing` and `reproduce table5 --preset mini`, small: they finish and write what their --help
    promises."""
    monkeypatch.chdir(tmp_path)
    code, out, err = cli_main(capsys, "reproduce", "sensing", "--preset", "tiny", "--seeds", "0,1", "--out", "s")
    assert code == 0, err
    assert "writes sensing.md/.csv and sensing.png" in _help(["reproduce", "sensing"])
    for name in ("sensing.md", "sensing.csv", "sensing.png"):
        assert (tmp_path / "s" / name).is_file(), name
    t5 = ["reproduce", "table5", "--preset", "mini", "--seeds", "0", "--epochs", "1", "--arms", "base,guarded-1e-4"]
    code, out, err = cli_main(capsys, *t5, "--out", "t5")
    assert code == 0, err
    promised = re.findall(r"table5[\w.]*\.(?:md|csv|png)", _help(["reproduce", "table5"]).replace("\n", ""))
    assert len(promised) == 4
    for name in promised:
        assert (tmp_path / "t5" / name.replace("MODEL", "yolov5n")).is_file(), name
    table = (tmp_path / "t5" / "table5.md").read_text()
    assert "±" not in table.split("Paired differences")[0]  # one seed: no spread claimed


# -- --help against behaviour ----------------------------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """{("train",): parser, ("classify", "train"): parser, …} for every command."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[(*prefix, name)] = sub
                found.update(_commands(sub, (*prefix, name)))
    return found


def _help(path: list[str]) -> str:
    return " ".join(_commands(build_parser())[tuple(path)].format_help().split())


# Flags a help names on purpose from another command: `data voc` says what `train --data voc.yaml` finds.
OTHER_COMMANDS_FLAGS = {("data", "voc"): {"--data"}}


@pytest.mark.parametrize("path", sorted(_commands(build_parser())), ids=" ".join)
def test_help_names_only_its_own_flags_and_no_literal_percent(path):
    """No `%%` left by argparse's escaping; every --flag a help names is one of the command's (a command group:
    of its commands), so no help points to a flag its command lacks."""
    commands = _commands(build_parser())
    parser = commands[path]
    text = parser.format_help()
    assert "%%" not in text and "%(" not in text
    own = set(parser._option_string_actions) | OTHER_COMMANDS_FLAGS.get(path, set())
    for sub, p in commands.items():
        if sub[: len(path)] == path:
            own |= set(p._option_string_actions)
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9](?![\w*-])", text))
    assert mentioned <= own, mentioned - own
