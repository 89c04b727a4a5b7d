"""Plain-torch versions of every op: readable first, float64-capable, the truth kernels are tested against."""
from .affine_step import affine_step
from .pointcloud import pointcloud_sample, pointcloud_step
from .posterior import posterior

__all__ = ["posterior", "affine_step", "pointcloud_step", "pointcloud_sample"]
