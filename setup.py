"""Build script. fastdiff is pure Python today; the compiled extension (csrc/, built with ninja through
torch.utils.cpp_extension) is added here when it lands. Metadata lives in pyproject.toml."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["fastdiff", "fastdiff.*"]))
