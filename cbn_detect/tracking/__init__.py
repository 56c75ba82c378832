"""Where metrics go: the trainer only knows the small ``MetricSink`` interface."""

from cbn_detect.tracking.sinks import DetectionPicture, JsonlSink, LoggingSink, MetricSink

__all__ = ["DetectionPicture", "JsonlSink", "LoggingSink", "MetricSink"]
