"""Every training layout that fits: the PP = 1 replica (`train/replica.FlatReplica`) over one,
data-parallel and expert-parallel gloo ranks, and PP x DP pipelines, give the loss and gradients
of one process on the same batch; a layout that cannot work is refused with a ValueError naming
the value, before any worker starts (`moeray bench train --pp 1`, one process without the pipeline,
is test_train_bench_one.py's).
The single-process reference and the comparison are test_pipeline.py's."""

import os
import re

import pytest
import torch
from test_pipeline import LOSS, SEED, B, S, _biases, _check, _reference, _run, _tokens

from moeray.platform.config import tiny
from moeray.platform.model.transformer import Transformer
from moeray.platform.parallel.distributed import Topology
from moeray.platform.parallel.pipeline import PipelineSpec
from moeray.platform.train import bench
from moeray.platform.train import step as ts
from moeray.platform.train.job_config import TrainJobConfig
from moeray.platform.train.replica import FlatReplica
from tests.spawn_ranks import init_file, spawn


def _job(**parallel) -> TrainJobConfig:
    return TrainJobConfig.from_dict(
        {
            "seed": SEED,
            "parallel": parallel,
            "data": {"global_batch": B, "seq_len": S},
            "loss": {"mtp_lambda": LOSS.mtp_lambda, "balance_alpha": LOSS.balance_alpha},
        }
    )


def _bias_LE():
    # the reference's biases (test_pipeline._biases), handed to the replica as the router would
    model = Transformer(tiny())
    _biases(model)
    return torch.stack([m.gate.e_score_correction_bias.clone() for m in ts.moe_layers(model)])


def _flat_worker(rank, world, init_file, out_dir, cases):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, parallel in cases:
            job = _job(**parallel)
            replica = FlatReplica(job, rank, world, torch.device("cpu"))
            replica.set_biases(_bias_LE())
            topology = Topology(1, job.parallel.dp, job.parallel.ep)
            rows = B // topology.shards
            shard = topology.shard(rank)
            parts = replica.step(_tokens()[shard * rows : (shard + 1) * rows])
            stats = torch.tensor([parts.main, parts.mtp, parts.balance], dtype=torch.float64)
            dist.all_reduce(stats)
            full = replica.full_state()
            moe_classes = sorted({type(m).__name__ for m in ts.moe_layers(replica.module)})
            torch.save(
                {
                    "grads": {n: p.grad for n, p in replica.module.named_parameters()},
                    "stats": stats / topology.shards,
                    "norm": parts.norm,
                    "loads": parts.loads_LE,
                    "ep_rank": replica.groups.ep_rank,
                    "grouped_fp8": False,  # the flat replica runs the per-expert path
                    "full": full,
                    "moe_classes": moe_classes,
                },
                os.path.join(out_dir, f"{name}-rank{rank}.pt"),
            )
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_flat(tmp_path, world, cases):
    spawn(
        _flat_worker,
        args=(world, init_file(tmp_path), str(tmp_path), cases),
        nprocs=world,
    )
    return {
        name: [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in range(world)]
        for name, _ in cases
    }


def test_one_device_replica_matches_single_process(tmp_path):
    ref_parts, ref_grads = _reference()
    results = _run_flat(tmp_path, 1, [("one", {})])
    _check(results, ref_parts, ref_grads)
    ref = Transformer(tiny())
    ref.reset_parameters(seed=SEED)
    assert results["one"][0]["full"].keys() == ref.state_dict().keys()


def test_data_and_expert_parallel_replicas_match_single_process(tmp_path):
    ref_parts, ref_grads = _reference()
    results = _run_flat(tmp_path, 2, [("dp2", {"dp": 2})])
    _check(results, ref_parts, ref_grads)
    results = _run_flat(tmp_path, 2, [("ep2", {"ep": 2})])
    _check(results, ref_parts, ref_grads, ep=2)
    # rank 0 gathers the expert shards into the full model; the others hand back nothing
    full, none = results["ep2"][0]["full"], results["ep2"][1]["full"]
    assert none is None
    E = tiny().n_routed_experts
    assert all(v.shape[0] == E for k, v in full.items() if ".experts." in k)


def test_pp_x_dp_and_odd_pp_match_single_process(tmp_path):
    ref_parts, ref_grads = _reference()
    cases = [("pp2dp2-zb1p", PipelineSpec(2, dp=2, schedule="zb1p", microbatches=2), False)]
    _check(_run(tmp_path, 4, cases), ref_parts, ref_grads)
    cases = [("pp3-1f1b", PipelineSpec(3, schedule="1f1b", microbatches=4), False)]
    _check(_run(tmp_path, 3, cases), ref_parts, ref_grads)


def test_every_fitting_layout_is_accepted_and_gpu_needs_no_pipeline():
    for parallel in (
        {},
        {"dp": 2},
        {"ep": 2},
        {"pp": 2, "schedule": "dualpipe", "microbatches": 4},
        {"pp": 3, "schedule": "1f1b", "microbatches": 2},
        {"pp": 2, "ep": 2, "dp": 2, "schedule": "zb1p", "microbatches": 2},
    ):
        job = TrainJobConfig.from_dict({"use_gpu": True, "parallel": parallel})
        job.check_model(job.model_config())
    # pp = 1 takes no schedule: the default (dualpipe) names none to run
    assert _job().parallel.schedule == "dualpipe"


@pytest.mark.parametrize(
    "parallel, config, match",
    [
        ({"pp": 3}, {}, r"schedule=dualpipe needs an even parallel\.pp, got pp=3.*1f1b or zb1p"),
        ({"pp": 2, "schedule": "gpipe"}, {}, r"schedule='gpipe'.*accepted: 1f1b, zb1p, dualpipe"),
        ({"pp": 2, "microbatches": 2}, {}, r"DualPipe needs an even number of micro-batches"),
        (
            {"ep": 3},
            {"data": {"global_batch": 9}},
            r"parallel\.ep=3 must divide.*\[1, 2, 4, 8, 16\]",
        ),
        ({"pp": 5, "schedule": "1f1b", "microbatches": 1}, {}, r"pp=5 stages need"),
        ({"dp": 3}, {}, r"global_batch=8 must be a multiple of the 3 data shards"),
        ({"dp": 0}, {}, r"parallel sizes must be >= 1"),
        ({}, {"cuda_graphs": True}, r"cuda_graphs=true needs use_gpu=true.*use_gpu=False"),
        (
            {"ep": 2},
            {"cuda_graphs": True, "use_gpu": True},
            r"cuda_graphs=true needs .*one rank.*got use_gpu=True, pp=1, ep=2, dp=1",
        ),
    ],
)
def test_bad_layouts_are_refused_before_any_worker(parallel, config, match):
    with pytest.raises(ValueError, match=match):
        job = TrainJobConfig.from_dict({"parallel": parallel, **config})
        job.check_model(job.model_config())


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--pp", "2", "--microbatches", "2"], r"DualPipe needs an even number of micro-batches"),
        (["--ep", "3"], r"ep=3 must divide the 16 routed experts"),
        (["--pp", "5"], r"pp=5 stages need"),
    ],
)
def test_bench_train_refuses_bad_layouts(flags, match, capsys):
    assert bench.main(flags) == 2
    assert re.search(match, capsys.readouterr().err)


def test_init_from_must_be_the_models_hf_directory(tmp_path):
    from moeray.platform.checkpoint import save_model

    save_model(Transformer(tiny()), tiny(), tmp_path / "tiny")
    job = TrainJobConfig.from_dict({"init_from": str(tmp_path / "tiny")})
    assert job.model == str(tmp_path / "tiny")  # the model defaults to the checkpoint's
    job.check_model(job.model_config())
    with pytest.raises(ValueError, match=r"holds another model than model='small'.*hidden_size"):
        job = TrainJobConfig.from_dict({"init_from": str(tmp_path / "tiny"), "model": "small"})
        job.check_model(job.model_config())
    with pytest.raises(ValueError, match=r"init_from='.*nowhere' is not an HF model directory"):
        job = TrainJobConfig.from_dict({"init_from": str(tmp_path / "nowhere"), "model": "tiny"})
        job.check_model(job.model_config())


@pytest.mark.parametrize(
    "text, match",
    [
        ("parallel: {ep: 3}\ndata: {global_batch: 9}\n", r"parallel\.ep=3 must divide"),
        ("parallel: {pp: 3, microbatches: 2}\n", r"dualpipe needs an even parallel\.pp, got pp=3"),
        ("init_from: /nowhere\nmodel: tiny\n", r"init_from='/nowhere' is not an HF model"),
    ],
)
def test_moeray_train_refuses_bad_layouts_before_ray(
    tmp_path, capsys, refuse_ray_init, text, match
):
    from moeray.platform.train import job

    (tmp_path / "train.yaml").write_text(text)
    assert job.main(["--config", str(tmp_path / "train.yaml")]) == 2
    assert re.search(match, capsys.readouterr().err)
