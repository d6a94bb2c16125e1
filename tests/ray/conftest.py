import os
import threading

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole tier (2 CPUs, no dashboard). Ray Train's controller
    polls its workers every 0.25 s, not 2: it sees a finished or killed worker group that much
    sooner (a 3-step job on 2 workers: 18 -> 15 s). Its preemption watcher, an actor per worker
    group that polls Ray for draining nodes (spot clusters; never here), is off: one process
    start (~1.5 s of CPU) less per training attempt.

    The workers' environment is the raylet's, inherited from this process at ray.init, not a
    job runtime_env: a worker of a job with one starts through setup_worker.py, a second Python
    start (~0.6 s of CPU) for each of the tier's ~100 worker processes."""
    import ray

    if not ray.is_initialized():
        env = {
            "OMP_NUM_THREADS": "1",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        finally:  # this process keeps its own settings; Ray's processes have theirs
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    yield ray
    ray.shutdown()


class _ServeShutdowns:
    """Serve's graceful shutdown on a thread. It is mostly waiting (the replicas' drain loops and
    the controller's; ~7 s for test_serve_app's apps, ~5 s for test_serve_ep's, at ~0.3 CPUs),
    which the next module's start then overlaps; a module that starts Serve on `ray_local` first
    waits for any shutdown still under way (`wait`), and so does the end of the session."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        from ray import serve

        t = threading.Thread(target=serve.shutdown, name="serve-shutdown", daemon=True)
        t.start()
        self.threads.append(t)

    def wait(self) -> None:
        while self.threads:
            t = self.threads.pop()
            t.join(timeout=120)
            assert not t.is_alive(), "serve.shutdown() did not return within 120 s"


@pytest.fixture(scope="session")
def serve_shutdowns(ray_local):
    """The session's `_ServeShutdowns` (torn down before `ray_local`: it waits for them)."""
    shutdowns = _ServeShutdowns()
    yield shutdowns
    shutdowns.wait()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A served model directory: tiny() with random weights (seed 0) and a small BPE tokenizer."""
    from moeray.platform.serve.bench import random_tiny_model

    return random_tiny_model(tmp_path_factory.mktemp("tiny-served"))
