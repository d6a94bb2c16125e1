"""Triton kernels under the CPU interpreter.

TRITON_INTERPRET must be set before triton.jit decorates the kernels: triton decides interpreter vs
compiler when a module's kernels are defined. If another test directory imported a kernel module
first, reload it so its kernels are rebuilt in interpreter mode.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"

for _name in [m for m in sys.modules if m.startswith("moeray.kernels.")]:
    importlib.reload(sys.modules[_name])


@pytest.fixture
def compiled_check():
    """Run a GPU check script compiled, not interpreted: TRITON_INTERPRET=1 is set for this whole
    process (above), so the script runs in a subprocess with TRITON_INTERPRET=0. Its output is
    printed, copied to $OUT/<out_name> when $OUT is set (the device machine), and must end well:
    exit code 0 and a "RESULT PASS" line."""

    def run(script: str, out_name: str) -> None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        root = Path(__file__).resolve().parents[2]
        path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path}
        proc = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
        )
        print(proc.stdout, proc.stderr[-4000:])
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], out_name).write_text(proc.stdout + proc.stderr[-4000:])
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "RESULT PASS" in proc.stdout, proc.stdout

    return run


@pytest.fixture
def launch_spy(monkeypatch):
    """launch_spy(module, "_kernel") replaces a module's Triton kernel by a stand-in that records
    each launch's grid and launches the real kernel; returns the list of grids."""

    def spy(module, name: str) -> list:
        real, grids = getattr(module, name), []

        class Spy:
            def __getitem__(self, grid):
                grids.append(grid)
                return real[grid]

        monkeypatch.setattr(module, name, Spy())
        return grids

    return spy


class _NanEmptyTorch:
    """torch, but `empty` fills with NaN: an output value a kernel leaves unwritten stays NaN and
    fails torch.equal."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))


@pytest.fixture
def nan_empty(monkeypatch):
    """nan_empty(module): the module's `torch.empty` fills with NaN (its wrappers' outputs)."""

    def poison(module) -> None:
        monkeypatch.setattr(module, "torch", _NanEmptyTorch())

    return poison
