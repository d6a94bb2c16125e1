import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole tier (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A served model directory: tiny() with random weights (seed 0) and a small BPE tokenizer."""
    from moeray.platform.serve.bench import random_tiny_model

    return random_tiny_model(tmp_path_factory.mktemp("tiny-served"))
