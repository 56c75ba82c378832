"""cbn_detect: how normalization changes one-stage detectors trained from scratch on PASCAL VOC."""

__version__ = "0.1.0"
