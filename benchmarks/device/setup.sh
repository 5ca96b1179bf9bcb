# There, at the start of every device command (source it, e.g. `source benchmarks/device/setup.sh || exit 1`):
# install the carried wheels beside the image's PyTorch (never replacing it), put the repository on the path,
# keep Ultralytics offline, build fashion-det from the carried Fashion-MNIST items (about 40 s).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" YOLO_OFFLINE=1 PYTHONUNBUFFERED=1
if [ ! -f datasets/fashion-det/fashion-det.yaml ]; then
  python3 -m sos_detect.cli data fashion-det --root .gpu/fmnist >/tmp/fashion-det.log 2>&1 || {
    tail -3 /tmp/fashion-det.log
    return 1
  }
  tail -2 /tmp/fashion-det.log
fi
