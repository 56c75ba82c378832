"""Where metrics go: the trainer only knows the small ``MetricSink`` interface."""

from cbn_detect.tracking.sinks import JsonlSink, LoggingSink, MetricSink

__all__ = ["JsonlSink", "LoggingSink", "MetricSink"]
