"""`moeray train --config configs/train/tiny.yaml`: the Ray Train job.

    ray start --head
    ray job submit --working-dir . -- moeray train --config configs/train/tiny.yaml
or simply `moeray train --config ...`, which starts a local Ray when none is running.

The driver (this module) trains the tokenizer and tokenizes the corpus once into the run
directory, creates the RouterActor (named, detached), and runs a `TorchTrainer` (Ray Train V2)
with PP x EP x DP workers, gloo on CPU and NCCL on GPU, `FailureConfig` retries and checkpoints
reported by the workers (`loop.py`). Rank 0 writes the final model as an HF directory with the
tokenizer, which `moeray serve` and transformers load.

Run directory: <storage>/<name>/, where `storage` is a path or a URI (s3://bucket/prefix, ...;
storage.py) that Ray Train's RunConfig persists checkpoints to as well. On a cluster it must be
shared by every node (a volume mounted on all of them, or an object store): nothing of the run is
read from or written to a path that only the driver's node has. It holds data/ (tokenizer/,
tokens.pt, model/config.json when `model` is a file), history.jsonl (one line per step, from rank
0; a step re-run after a resume is marked "replay", history.py), history.rolled_back.jsonl (the
records a resume rolled back), router_state.pt, Ray Train's checkpoints, and the final model
(`output`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from moeray.platform.config import PRESETS
from moeray.platform.parallel.distributed import CUDA_ENV, GRAPHS_CUDA_ENV, dist_timeout_s
from moeray.platform.plan.check import check_train
from moeray.platform.routing.state import RouterConfig
from moeray.platform.train import data
from moeray.platform.train.job_config import TrainJobConfig
from moeray.platform.train.loop import train_loop_per_worker
from moeray.platform.train.storage import Storage, uri_scheme


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> TrainJobConfig:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"train config {str(path)!r} does not exist")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"train config {path} must be a mapping, got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = value
    return TrainJobConfig.from_dict(raw)


def prepare_data(job: TrainJobConfig, run: Storage) -> None:
    """Tokenizer and token stream in `run`/data/ (tokenizer/, tokens.pt), built once per (corpus,
    vocab, size, start tokenizer) and reused; with a `model` config file, its copy in
    data/model/config.json. Built in a local scratch directory, then uploaded (unless the storage
    is the local filesystem, where it is built in place)."""
    data_dir = run.join("data")
    start = str(Path(job.init_from).expanduser().resolve()) if job.init_from else None
    key = {
        "corpus": job.data.corpus,
        "vocab_size": job.data.vocab_size,
        "max_bytes": job.data.max_bytes,
        "tokenizer": start,  # fine-tuning: the checkpoint's tokenizer, else one trained here
    }
    stamp = data_dir.join("data.json")
    with tempfile.TemporaryDirectory(prefix="moeray-data-") as tmp:
        local = data_dir.local_path or Path(tmp)
        if job.model not in PRESETS:  # workers read the model's shape from the run, not `model`
            (local / "model").mkdir(parents=True, exist_ok=True)
            shutil.copy(model_config_file(job.model), local / "model" / "config.json")
        fresh = (
            stamp.exists()
            and json.loads(stamp.read_text()) == key
            and data_dir.join("tokens.pt").exists()
            and data_dir.join("tokenizer", "tokenizer.json").exists()
        )
        if not fresh:
            corpus = None if job.data.corpus in ("", "stdlib") else job.data.corpus
            data.prepare_corpus(
                local,
                corpus,
                vocab_size=job.data.vocab_size,
                max_bytes=job.data.max_bytes,
                tokenizer=start,
            )
        data_dir.upload(local)
    if not fresh:
        stamp.write_text(json.dumps(key) + "\n")


def model_config_file(model: str) -> Path:
    """The config.json of `model` (a config file or an HF directory)."""
    p = Path(model).expanduser()
    return p / "config.json" if p.is_dir() else p


def run(job: TrainJobConfig, filesystem: pafs.FileSystem | None = None) -> Storage:
    """Run the job to completion; returns where the final HF model directory is (a local path,
    `os.fspath`-able, when the storage is the local filesystem). With `filesystem`, `job.storage`
    is a path on it (Ray's `storage_filesystem`), else a path or a URI."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # the actor module imports Ray at the top: only where Ray is wanted
    from moeray.actors.router import get_or_create_router

    model_cfg = job.model_config()
    job.check_model(model_cfg)  # a layout the model cannot split stops here, before Ray starts
    storage = Storage.at(job.storage, filesystem)
    run_dir = storage.join(job.name)
    prepare_data(job, run_dir)

    if not ray.is_initialized():
        # under `ray job submit` RAY_ADDRESS points at the cluster; alone, this starts a local Ray.
        # The pipeline workers' CUDA settings must precede their CUDA contexts
        # (distributed.CUDA_ENV); a graphed job keeps torch's caching allocator, under which
        # captured tensors have addresses Triton accepts (distributed.GRAPHS_CUDA_ENV).
        cuda_env = GRAPHS_CUDA_ENV if job.cuda_graphs else CUDA_ENV
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **cuda_env}
        ray.init(address=os.environ.get("RAY_ADDRESS"), runtime_env={"env_vars": env})
    world = job.parallel.world
    router_cfg = RouterConfig.from_model(
        model_cfg, num_reporters=world, gamma=job.gamma, gamma_changes=job.gamma_changes()
    )
    get_or_create_router(
        job.router, job.router_namespace, router_cfg, state_path=run_dir.join("router_state.pt")
    )

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job.to_dict(),
            "run_dir": run_dir,  # a Storage: workers read and write the run through it
            "run_id": uuid.uuid4().hex,
        },
        # A hung collective fails after MOERAY_DIST_TIMEOUT_S (default 600 s), not Ray's 1800 s.
        torch_config=TorchConfig(
            backend="nccl" if job.use_gpu else "gloo", timeout_s=int(dist_timeout_s())
        ),
        scaling_config=ScalingConfig(
            num_workers=world, use_gpu=job.use_gpu, resources_per_worker={"CPU": 1}
        ),
        run_config=RunConfig(
            name=job.name,
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return run_dir.resolve(job.output)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeray train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML train config (configs/train/*.yaml)")
    p.add_argument("--steps", type=int, help="override `steps`")
    p.add_argument("--name", help="override the run name")
    p.add_argument(
        "--storage", help="override the storage: a path (shared by all nodes) or a URI (s3://...)"
    )
    p.add_argument("--output", help="override the final model directory")
    p.add_argument(
        "--fp8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train the attention and expert projections in FP8",
    )
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        job = load_config(
            args.config,
            {
                "steps": args.steps,
                "name": args.name,
                "storage": args.storage,
                "output": args.output,
                "fp8": args.fp8,
            },
        )
        job.check_model(job.model_config())  # a layout the model cannot split stops here
        uri_scheme(job.storage)  # so does a storage URI that pyarrow cannot reach
        notes = check_train(job)  # a layout that cannot fit stops here, before Ray starts
    except ValueError as e:
        print(f"moeray train: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"moeray train: note: {note}", file=sys.stderr)
    out = run(job)
    print(f"moeray train: done; model at {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
