"""GPU tests run the compiled Triton kernels. tests/kernels/conftest.py sets TRITON_INTERPRET=1 for
its whole pytest process (and reloads the kernel modules), so tests/gpu collected in the same
process would run every kernel in the CPU interpreter: on 2x H200 (2026-11-27) three engine tests
failed so, with interpreter errors and no captured CUDA graph. Refuse that mix loudly.

MOERAY_TEST_PREFILL_GRAPH_TOKENS=N runs every engine the tests build with prefill-chunk graphs up
to N tokens (0: none) unless the test sets its own (EngineConfig.prefill_graph_tokens, default
256): how another value is checked against the whole GPU suite (scripts/device/chunk-graphs.sh)."""

import dataclasses
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


@pytest.fixture(autouse=True)
def _engine_defaults(monkeypatch):
    tokens = os.environ.get("MOERAY_TEST_PREFILL_GRAPH_TOKENS")
    if not tokens:
        return
    from moeray.platform.engine import engine as engine_mod
    from moeray.platform.engine.engine_config import EngineConfig

    @dataclasses.dataclass(frozen=True)
    class ChunkGraphsConfig(EngineConfig):
        prefill_graph_tokens: int = int(tokens)

    monkeypatch.setattr(engine_mod, "EngineConfig", ChunkGraphsConfig)
