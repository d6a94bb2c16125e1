import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole tier (2 CPUs, no dashboard). Ray Train's controller
    polls its workers every 0.25 s, not 2: it sees a finished or killed worker group that much
    sooner (a 3-step job on 2 workers: 18 -> 15 s)."""
    import ray

    if not ray.is_initialized():
        env = {"OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": env},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A served model directory: tiny() with random weights (seed 0) and a small BPE tokenizer."""
    from moeray.platform.serve.bench import random_tiny_model

    return random_tiny_model(tmp_path_factory.mktemp("tiny-served"))
