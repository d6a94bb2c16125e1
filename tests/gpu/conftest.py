"""GPU tests run the compiled Triton kernels. tests/kernels/conftest.py sets TRITON_INTERPRET=1 for
its whole pytest process (and reloads the kernel modules), so tests/gpu collected in the same
process would run every kernel in the CPU interpreter: on 2x H200 (2026-11-27) three engine tests
failed so, with interpreter errors and no captured CUDA graph. Refuse that mix loudly."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _compiled_kernels():
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail(
            "TRITON_INTERPRET=1 in a GPU test (tests/kernels sets it for its pytest process): "
            "run tests/gpu and tests/kernels in separate pytest commands"
        )
