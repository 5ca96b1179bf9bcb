#!/usr/bin/env bash
# Here (a machine with the package registries and the project venv active), once: what a bare GPU machine of
# the `device` tool lacks.
# Its image has Python 3.12, PyTorch, torchvision, OpenCV, SciPy, matplotlib; it has no network. This puts the
# missing wheels in .whl/ (polars 1.20, 33 MB: the newest is 55 MB, over what a call carries) and the
# Fashion-MNIST items fashion-det uses (for `sos-detect data fashion-det`) in .gpu/fmnist/,
# both ignored by git through .git/info/exclude; a device call carries them with carry=[".whl", ".gpu"].
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude=$(git rev-parse --git-path info/exclude) # .git may be a file (a worktree)
mkdir -p "$(dirname "$exclude")" .whl .gpu/fmnist
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >>"$exclude"
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo /.gpu/ >>"$exclude"
for spec in ultralytics==8.4.190 ultralytics-thop==2.2.3 pycocotools==2.0.11 polars==1.20.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$spec"
done
python3 benchmarks/device/sparse_fashion_mnist.py .gpu/fmnist  # 7.5 MB instead of Debian's 30 MB
