import os

import pytest
import torch

# Two cores in CI: one intra-op thread per process keeps several test processes from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Without a GPU every Triton kernel runs in the interpreter. Set before anything imports triton:
# triton builds its own standard library (tl.max, ...) in one mode when it is first imported, and
# a test module collected before tests/kernels (tests/gpu imports moeray.platform.fp8, which
# imports the kernels) would otherwise fix it to compiled mode for the whole process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA (runs on the device machine)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture
def refuse_ray_init(monkeypatch):
    """Code that must run before Ray: any ray.init call fails the test, and Ray, unless it was
    already running (the Ray tier's session instance in the full suite), must not run after."""
    ray = pytest.importorskip("ray")
    running = ray.is_initialized()

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "init", refuse)
    yield
    assert running or not ray.is_initialized(), "Ray was started"
