# Only for cffi: it generates kmodguard/kmod/_libkmod.py (out-of-line ABI mode) at build time.
from setuptools import setup

setup(cffi_modules=["kmodguard/kmod/_build.py:ffibuilder"])
