"""Normalization layers for the study, behind one factory (``build_norm``) and one model-wide
conversion (``convert_norm``) driven by the ``norm`` config group."""

from cbn_detect.norm.brn import BatchRenorm2d
from cbn_detect.norm.cbn import CrossIterationBatchNorm2d
from cbn_detect.norm.convert import convert_norm
from cbn_detect.norm.diagnostics import norm_diagnostics
from cbn_detect.norm.registry import NORM_NAMES, NORMS, build_norm, norm_options, norm_spec, resolve_burnin
from cbn_detect.norm.syncbn import SyncBatchNorm2d, use_native_sync_batchnorm

__all__ = [
    "NORMS",
    "NORM_NAMES",
    "BatchRenorm2d",
    "CrossIterationBatchNorm2d",
    "SyncBatchNorm2d",
    "build_norm",
    "convert_norm",
    "norm_diagnostics",
    "norm_options",
    "norm_spec",
    "resolve_burnin",
    "use_native_sync_batchnorm",
]
