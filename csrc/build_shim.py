# SPDX-License-Identifier: Apache-2.0
"""cffi API-mode build of ondemand_d._shim (run by setuptools through cffi_modules)."""
import re
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
_header = (HERE / "shim.h").read_text()
_cdef = _header.split("/* cdef-begin */")[1].split("/* cdef-end */")[0]
# The compiler fills in every constant: cffi sees "#define NAME ...".
_cdef = re.sub(r"^#define (\w+) .*$", r"#define \1 ...", _cdef, flags=re.M)

ffibuilder = cffi.FFI()
ffibuilder.cdef(_cdef)
ffibuilder.set_source(
    "ondemand_d._shim",
    '#include "shim.h"',
    sources=["csrc/shim.c"],  # relative: setuptools runs this from the project root
    include_dirs=["csrc"],
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
