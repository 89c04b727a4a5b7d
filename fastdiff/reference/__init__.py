"""Plain-torch versions of every op: readable first, float64-capable, the truth kernels are tested against.
One module per op (the same stem as fastdiff/triton/<op>.py, csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu)."""
from .affine_step import affine_step
from .pointcloud_sample import pointcloud_sample
from .pointcloud_step import pointcloud_step
from .posterior import posterior

__all__ = ["posterior", "affine_step", "pointcloud_step", "pointcloud_sample"]
