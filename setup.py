# Only for cffi: it generates kmodguard/kmod/_libkmod.py (out-of-line ABI mode) at build time.
from setuptools import setup

# The license lives here, not in pyproject.toml: the table form that Debian 12's setuptools (66)
# needs is deprecated by setuptools 77 and later (pages of warnings), and the SPDX string form
# that 77 wants is refused by 66. Declared dynamic there, a plain keyword here is accepted quietly by both.
setup(cffi_modules=["kmodguard/kmod/_build.py:ffibuilder"], license="LGPL-2.1-or-later")
