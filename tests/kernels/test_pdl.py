"""Programmatic dependent launch (kernels/common.py's `pdl_launch`): on only for compiled kernels
on CUDA devices of compute capability >= 9 (faked here: no GPU needed), off on CPU, under the
interpreter, on ROCm and with MOERAY_FUSED_PDL=0; and every PDL kernel follows the rule in the
PTX Triton emits for sm_90 (scripts/pdl_ptx_check.py, compiled without a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeray.kernels import common

CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def compiled_sm(monkeypatch):
    """Fakes a compiled (not interpreted) run on a CUDA device; returns a setter of its compute
    capability's major number."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("MOERAY_FUSED_PDL", raising=False)
    monkeypatch.setattr(torch.version, "hip", None)

    def set_major(major: int) -> None:
        monkeypatch.setattr(common, "_cuda_major", lambda index: major)

    return set_major


def test_pdl_on_from_sm90(compiled_sm):
    compiled_sm(9)
    assert common.pdl_launch(CUDA0)
    compiled_sm(10)
    assert common.pdl_launch(CUDA0)
    compiled_sm(8)
    assert not common.pdl_launch(CUDA0)


def test_pdl_off_by_switch_interpreter_cpu_and_rocm(compiled_sm, monkeypatch):
    compiled_sm(9)
    assert not common.pdl_launch(torch.device("cpu"))
    monkeypatch.setenv("MOERAY_FUSED_PDL", "0")
    assert not common.pdl_launch(CUDA0)
    monkeypatch.setenv("MOERAY_FUSED_PDL", "1")
    assert common.pdl_launch(CUDA0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not common.pdl_launch(CUDA0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.version, "hip", "6.4")  # ROCm reports gfx9 GPUs as 9.x
    assert not common.pdl_launch(CUDA0)


def test_pdl_off_in_this_process():
    # tests/kernels runs the interpreter: every kernel test here runs the plain kernels
    assert not common.pdl_launch(torch.device("cpu"))
    assert not common.pdl_launch(CUDA0)


def test_pdl_kernels_follow_the_rule_in_sm90_ptx():
    """Each PDL kernel, compiled for sm_90: no store or atomic before griddepcontrol.wait, no load
    either except the weight prefetch of gemv, fp8_gemv, head_gemv and the router logits (which
    must be there); no griddepcontrol in the plain kernels. A subprocess: the kernels of this
    process are interpreted (~18 s on 2 cores with an empty Triton cache)."""
    root = Path(__file__).resolve().parents[2]
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, str(root / "scripts" / "pdl_ptx_check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "RESULT PASS" in proc.stdout, proc.stdout + proc.stderr[-3000:]
