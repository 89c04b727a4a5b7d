"""fastdiff: correct and fast samplers for score-based diffusion models.

Imports nothing compiled and never touches a GPU driver: compiled backends load lazily on first use.
"""
from . import datasets, methods, metrics, noise, ops
from .denoisers import Denoiser, Gaussian, GaussianMixture, ModelDenoiser, PointCloud, from_model
from .oracle import gaussian_oracle
from .processes import OU, VE, VP, DriftedVE, Process, PureVE
from .sampling import GridWarning, sample
from .schedules import SCHEDULES, check_times, time_grid
from .steps import METHODS, StepTable, step_table

__version__ = "0.1.0"

__all__ = [
    "OU", "VP", "VE", "PureVE", "DriftedVE", "Process",
    "time_grid", "check_times", "SCHEDULES",
    "step_table", "StepTable", "METHODS",
    "PointCloud", "GaussianMixture", "Gaussian", "Denoiser", "ModelDenoiser", "from_model",
    "sample", "GridWarning", "gaussian_oracle", "noise", "ops", "datasets", "metrics", "methods", "k_diffusion",
    "__version__",
]

# Loaded on first use (fd.k_diffusion.sample_dpmpp_2m): plain torch, but not needed by most programs.
# fastdiff.diffusers needs the optional diffusers package: import it explicitly.
_LAZY_SUBMODULES = ("k_diffusion",)


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")
