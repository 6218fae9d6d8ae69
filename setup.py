"""Build script. Metadata lives in pyproject.toml; this file is where the C++/CUDA extensions will be
declared (they arrive with the C++ issue). Install with `pip install --no-build-isolation -e .`."""
from setuptools import setup

setup()
