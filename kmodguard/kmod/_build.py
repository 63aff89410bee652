"""cffi out-of-line ABI mode: turn the declarations into kmodguard.kmod._libkmod at build time.

Parsing C declarations at run time costs about 35 ms a start (pycparser); the generated module
imports in about 1 ms. Nothing is compiled: libkmod.so.2 is still opened at run time.
"""

import importlib.util
import os

from cffi import FFI

_spec = importlib.util.spec_from_file_location("_cdef", os.path.join(os.path.dirname(__file__), "_cdef.py"))
_cdef = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cdef)

ffibuilder = FFI()
ffibuilder.cdef(_cdef.CDEF)
ffibuilder.set_source("kmodguard.kmod._libkmod", None)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.join(os.path.dirname(__file__), "..", ".."), verbose=True)
