# SPDX-License-Identifier: Apache-2.0
"""Only here because cffi_modules needs setuptools' setup() hook."""
from setuptools import setup

setup(cffi_modules=["csrc/build_shim.py:ffibuilder"])
