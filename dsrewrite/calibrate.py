"""Data-aware initialisation of a separable or low-rank pair (whitened SVD, ridge refit): the public API in one place.

A façade kept for compatibility. The maths (patch statistics, whitening, solvers, one conv) lives in
:mod:`dsrewrite.calib_solve`; running a torch model to feed it (batches, hooks, sequential calibration) in
:mod:`dsrewrite.calib_run`.
"""
from __future__ import annotations

from .calib_run import CalibLayer, as_batches, calibrate_sequential, collect_patch_stats
from .calib_solve import (DAMP, RIDGE, CalibResult, LayerCalibrator, LayerInputs, LinearFit, PatchStats,
                          calibrate_conv, patch_conv, patch_conv_like, whiten_roots, whitened_factors,
                          whitened_rank_errors)

__all__ = [
    "PatchStats", "LayerInputs", "LinearFit", "LayerCalibrator", "CalibResult", "whiten_roots", "whitened_factors",
    "whitened_rank_errors", "calibrate_conv", "calibrate_sequential", "collect_patch_stats", "as_batches",
    "DAMP", "RIDGE", "CalibLayer", "patch_conv", "patch_conv_like",
]
