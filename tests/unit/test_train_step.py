"""Training step: objective pieces, learning-rate schedule, optimizer settings, FP8 vs higher
precision on the tiny model, and the job config parser."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from moeray.platform.config import tiny
from moeray.platform.model.transformer import Transformer
from moeray.platform.routing.balance import sequence_balance_loss
from moeray.platform.train import step as ts


def _model(seed=0):
    m = Transformer(tiny())
    m.reset_parameters(seed=seed)
    return m


def _tokens(B=3, S=17, seed=1):
    return torch.randint(
        0, tiny().vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(seed)
    )


def test_learning_rate_warmup_then_cosine():
    cfg = ts.OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, total_steps=50)
    lrs = [ts.learning_rate(s, cfg) for s in range(50)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4)
    mid = 10 + (50 - 10 - 1) / 2  # halfway through the cosine: the mean of peak and floor
    assert ts.learning_rate(int(mid), cfg) == pytest.approx(
        1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * int(mid - 10) / 39))
    )
    with pytest.raises(ValueError, match="warmup_steps"):
        ts.OptimConfig(warmup_steps=60, total_steps=50)


def test_optimizer_settings():
    m = _model()
    opt = ts.build_optimizer(m, ts.OptimConfig())
    assert opt.defaults["betas"] == (0.9, 0.95)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(
        p.dim() == 1 for p in no_decay["params"]
    )
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_loss_is_ce_plus_mtp_plus_sequence_balance():
    m = _model()
    tokens = _tokens()
    cfg = ts.LossConfig(mtp_lambda=0.3, balance_alpha=0.01)
    parts = ts.compute_loss(m, tokens, cfg)
    # recompute independently from a second forward
    out = m(tokens[:, :-1])
    B, S = tokens.shape[0], tokens.shape[1] - 1
    main = F.cross_entropy(out.logits.reshape(B * S, -1), tokens[:, 1:].reshape(-1))
    # MTP depth 1 at position s predicts token s+2
    mtp = F.cross_entropy(out.mtp_logits[0].reshape(B * (S - 1), -1), tokens[:, 2:].reshape(-1))
    bal = 0.0
    for moe in ts.moe_layers(m):
        r = moe.last_routing
        T = r.scores_TE.shape[0]
        bal += sequence_balance_loss(
            r.scores_TE.view(B, T // B, -1), r.expert_ids_TK.view(B, T // B, -1), 0.01
        ).item()
    assert parts.main == pytest.approx(main.item(), rel=1e-6)
    assert parts.mtp == pytest.approx(mtp.item(), rel=1e-6)
    assert parts.balance == pytest.approx(bal, rel=1e-6) and parts.balance > 0
    assert parts.total.item() == pytest.approx(main.item() + 0.3 * mtp.item() + bal, rel=1e-6)
    # the loss at init is about log(V): nothing is learned yet, and the targets are aligned
    assert abs(parts.main - math.log(tiny().vocab_size)) < 0.1


def test_train_step_learns_and_clips():
    torch.manual_seed(0)
    m = _model()
    cfg = ts.OptimConfig(lr=3e-3, warmup_steps=2, total_steps=25, clip=1.0)
    opt = ts.build_optimizer(m, cfg)
    batch = _tokens(B=2, S=32, seed=3)
    first = None
    for s in range(25):
        r = ts.train_step(m, opt, batch, s, cfg, ts.LossConfig())
        first = first if first is not None else r.loss.main
        assert r.lr == pytest.approx(ts.learning_rate(s, cfg))
        assert r.loads_LE.shape == (len(ts.moe_layers(m)), tiny().n_routed_experts)
        # K assignments per token; the MTP block sees S-1 positions
        assert r.loads_LE[0].sum() == 2 * 32 * tiny().num_experts_per_tok
    assert r.loss.main < first - 1.0  # memorizes a fixed batch
    # clipping: a step with a huge gradient moves the weights by at most lr * (Adam's ~1 per
    # element)
    assert r.grad_norm > 0


def test_set_biases_reaches_every_moe_layer():
    m = _model()
    L, E = len(ts.moe_layers(m)), tiny().n_routed_experts
    b = torch.randn(L, E)
    ts.set_biases(m, b)
    assert all(
        torch.equal(moe.e_score_correction_bias, b[i]) for i, moe in enumerate(ts.moe_layers(m))
    )
    with pytest.raises(ValueError, match="MoE layers"):
        ts.set_biases(m, b[:1])


def test_fp8_training_tracks_higher_precision():
    """Same steps, same data: FP8 projections vs fp32 everywhere; final loss within 0.25%."""
    from moeray.platform.fp8 import enable_fp8_training

    def train(fp8):
        torch.manual_seed(0)
        m = _model()
        if fp8:
            enable_fp8_training(m)
        cfg = ts.OptimConfig(lr=3e-3, warmup_steps=3, total_steps=16)
        opt = ts.build_optimizer(m, cfg)
        losses = [
            ts.train_step(
                m, opt, _tokens(B=4, S=32, seed=100 + s), s, cfg, ts.LossConfig()
            ).loss.main
            for s in range(16)
        ]
        return sum(losses[-4:]) / 4

    base, fp8 = train(False), train(True)
    rel = abs(fp8 - base) / base
    assert fp8 != base and rel < 0.0025, (base, fp8, rel)


def test_job_config_parsing(tmp_path):
    from moeray.platform.train.job import load_config
    from moeray.platform.train.job_config import TrainJobConfig

    job = load_config("configs/train/tiny.yaml")
    assert job.parallel.world == 2 and job.optim.total_steps == job.steps
    assert job.optim.betas == (0.9, 0.95) and job.loss.balance_alpha == 1e-4
    assert TrainJobConfig.from_dict(job.to_dict()) == job
    with pytest.raises(ValueError, match="unknown train config keys"):
        TrainJobConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="multiple of"):
        TrainJobConfig.from_dict({"parallel": {"ep": 3}, "data": {"global_batch": 8}})
    pp = load_config("configs/train/tiny-pp2.yaml")
    assert (pp.parallel.pp, pp.parallel.schedule, pp.parallel.microbatches, pp.parallel.world) == (
        2,
        "dualpipe",
        4,
        2,
    )
    with pytest.raises(ValueError, match="2\\*pp"):
        TrainJobConfig.from_dict({"parallel": {"pp": 4, "microbatches": 4}})
    with pytest.raises(ValueError, match="equal micro-batches"):
        TrainJobConfig.from_dict(
            {"parallel": {"pp": 2, "microbatches": 6}, "data": {"global_batch": 8}}
        )
    with pytest.raises(ValueError, match="schedule='gpipe' is not a schedule"):
        TrainJobConfig.from_dict({"parallel": {"pp": 2, "schedule": "gpipe"}})
    assert TrainJobConfig.from_dict({"use_gpu": True}).parallel.world == 1  # one GPU trains
    assert load_config("configs/train/small-pp2-ep2-gpu.yaml").use_gpu
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 1.0, momentum: 0.9}\n")
    with pytest.raises(ValueError, match="momentum"):
        load_config(bad)


def test_fused_adamw_step_refreshes_cached_weights():
    """A fused AdamW (the CUDA default, `adamw_impl`) leaves the parameters' version counters
    alone; `track_fused_updates` moves them, so fp8.WeightCache (FP8 quantizations and the bf16
    casts of grouped experts) makes a new entry from the updated weight instead of a stale hit."""
    from moeray.platform.fp8 import WeightCache

    w = torch.nn.Parameter(torch.randn(8, 16))
    cache = WeightCache()
    before = cache.cast(w, torch.bfloat16)
    opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    ts.track_fused_updates(opt)
    w.grad = torch.ones_like(w)
    opt.step()
    after = cache.cast(w, torch.bfloat16)
    assert torch.equal(after, w.detach().to(torch.bfloat16))
    assert not torch.equal(after, before)
