import importlib.util
import os
from pathlib import Path

# Two cores in CI (2 pytest workers; in the Ray tier the driver beside Ray's workers): one
# intra-op thread per process keeps several test processes from thrashing. Set before torch is
# imported, which sizes its OpenMP pool (and numpy's OpenBLAS) then: a second thread only spins
# on the core another process holds (torch-heavy unit tests beside a busy process: -25% time,
# -40% CPU). Larger machines keep torch's default in this process and 2 threads in subprocesses.
if (os.cpu_count() or 1) <= 2:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
# Without a GPU every Triton kernel runs in the interpreter. Set before anything imports triton:
# triton builds its own standard library (tl.max, ...) in one mode when it is first imported, and
# a test module collected before tests/kernels (tests/gpu imports moeray.platform.fp8, which
# imports the kernels) would otherwise fix it to compiled mode for the whole process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_triton_lang_once_per_launch() -> None:
    """Triton's interpreter (3.9) patches triton.language for the interpreter at each launch
    (GridExecutor) and again at every call of a @triton.jit helper inside it
    (InterpretedFunction.__call__), though the launch's patch is still in place: the same module
    objects, whose builtins are already wrapped (not builtins any more, so left alone) and whose
    other attributes get equal replacements. The scans (inspect.getmembers of triton.language,
    its tensor and math) took ~35% of the interpreted kernels' time. A helper call inside a
    launch whose modules the launch patched skips them; every other call patches as before. The
    kernels run the same code: only where Triton's interpreter has these two names."""
    from triton.runtime import interpreter as interp

    if not (hasattr(interp, "_patch_lang") and hasattr(interp, "_LangPatchScope")):
        return
    import inspect

    import triton.language as tl

    patch, launch = interp._patch_lang, interp.GridExecutor.__call__
    patched: list[frozenset | None] = []  # the modules patched in the innermost running launch

    def langs(fn) -> frozenset:
        return frozenset(
            id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)
        )

    def patch_lang(fn):
        mods = langs(fn)
        if patched and patched[-1] is not None and mods <= patched[-1]:
            return interp._LangPatchScope()  # the launch's patch stands
        scope = patch(fn)
        if patched:  # the launch's own patch, or a helper's of a module it had not patched
            patched[-1] = mods | (patched[-1] or frozenset())
        return scope

    def grid_call(self, *args, **kwargs):
        patched.append(None)
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    interp._patch_lang = patch_lang
    interp.GridExecutor.__call__ = grid_call


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _patch_triton_lang_once_per_launch()


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


@pytest.fixture
def tiny_train_job(tmp_path):
    """`make(name, **keys)`: a short TrainJobConfig of `tiny()` (3 steps on 4 x 32 tokens, one
    checkpoint at the end) storing under tmp_path; `keys` override or add top-level keys."""
    from moeray.platform.train.job_config import TrainJobConfig

    def make(name: str, **keys):
        return TrainJobConfig.from_dict(
            {  # `model` left out: tiny, or the `init_from` directory's
                "name": name,
                "storage": str(tmp_path),
                "output": "model",
                "steps": 3,
                "log_every": 1,
                "checkpoint_every": 3,
                "max_failures": 0,
                "router_name": f"router-{tmp_path.name}",
                "data": {"max_bytes": 300_000, "seq_len": 32, "global_batch": 4},
                "optim": {"warmup_steps": 1},
                **keys,
            }
        )

    return make


@pytest.fixture
def check_first_step():
    """`check(job, run_dir, first_record, rel=1e-5)`: a training job's step 0 (the initial
    weights of `job.seed`, zero biases, global batch 0) has the loss of one CPU process on the
    whole batch."""
    from moeray.platform.model.transformer import Transformer
    from moeray.platform.train import data as tdata
    from moeray.platform.train import step as tstep

    def check(job, run_dir, rec: dict, rel: float = 1e-5) -> None:
        ds = tdata.PackedDataset(torch.load(run_dir / "data" / "tokens.pt"), job.data.seq_len)
        batch = tdata.BatchLoader(ds, job.data.global_batch, seed=job.data.seed).next_batch()
        ref = Transformer(job.model_config())
        ref.reset_parameters(seed=job.seed)
        parts = tstep.compute_loss(ref, batch, job.loss)
        assert rec["loss"] == pytest.approx(parts.main, rel=rel)
        assert rec["mtp_loss"] == pytest.approx(parts.mtp, rel=rel)
        assert rec["balance"] == pytest.approx(parts.balance, rel=max(rel, 1e-4))

    return check


@pytest.fixture
def load_script():
    """load_script("name") imports scripts/name.py as a module (the scripts are not a package)."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
