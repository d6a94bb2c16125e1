"""Triton kernels under the CPU interpreter.

TRITON_INTERPRET must be set before triton.jit decorates the kernels: triton decides interpreter vs
compiler when a module's kernels are defined. If another test directory imported a kernel module
first, reload it so its kernels are rebuilt in interpreter mode.
"""

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

for _name in [m for m in sys.modules if m.startswith("moeray.kernels.")]:
    importlib.reload(sys.modules[_name])
