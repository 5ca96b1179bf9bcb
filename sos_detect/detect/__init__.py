"""Detection: SOS inside Ultralytics YOLO training, head discovery, data tools and evaluation."""

from sos_detect.detect.heads import detect_head_layers
from sos_detect.detect.trainer import SOSDetectionTrainer

__all__ = ["SOSDetectionTrainer", "detect_head_layers"]
