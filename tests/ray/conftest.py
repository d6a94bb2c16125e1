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


@pytest.fixture
def check_first_step():
    """`check(job, run_dir, first_record)`: a training job's step 0 (the initial weights of
    `job.seed`, zero biases, global batch 0) has the loss of one process on the whole batch."""
    import torch

    from moeray.platform.model.transformer import Transformer
    from moeray.platform.train import data as tdata
    from moeray.platform.train import step as tstep

    def check(job, run_dir, rec: dict) -> None:
        ds = tdata.PackedDataset(torch.load(run_dir / "data" / "tokens.pt"), job.data.seq_len)
        batch = tdata.BatchLoader(ds, job.data.global_batch, seed=job.data.seed).next_batch()
        ref = Transformer(job.model_config())
        ref.reset_parameters(seed=job.seed)
        parts = tstep.compute_loss(ref, batch, job.loss)
        assert rec["loss"] == pytest.approx(parts.main, rel=1e-5)
        assert rec["mtp_loss"] == pytest.approx(parts.mtp, rel=1e-5)
        assert rec["balance"] == pytest.approx(parts.balance, rel=1e-4)

    return check
