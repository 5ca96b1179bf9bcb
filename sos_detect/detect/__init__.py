"""Detection: SOS inside Ultralytics YOLO training (detect, segment, pose, OBB), head discovery, data tools and
evaluation."""

from sos_detect.detect.heads import detect_head_layers
from sos_detect.detect.trainer import (
    SOSDetectionTrainer,
    SOSOBBTrainer,
    SOSPoseTrainer,
    SOSSegmentationTrainer,
    SOSTrainerMixin,
    sos_trainer,
)

__all__ = [
    "SOSDetectionTrainer",
    "SOSOBBTrainer",
    "SOSPoseTrainer",
    "SOSSegmentationTrainer",
    "SOSTrainerMixin",
    "detect_head_layers",
    "sos_trainer",
]
