# There, at the start of every device command (source it): install the carried wheels beside the image's
# PyTorch (never replacing it), put the repository on the path, keep Ultralytics offline, build fashion-det.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH="/tmp/site:$PWD" YOLO_OFFLINE=1 PYTHONUNBUFFERED=1
[ -f datasets/fashion-det/fashion-det.yaml ] || python3 -m sos_detect.cli data fashion-det --root .gpu/fmnist \
  | tail -2
