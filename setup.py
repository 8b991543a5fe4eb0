# The native helper is a cffi extension; everything else lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["gguf_stream/_build_native.py:ffibuilder"])
