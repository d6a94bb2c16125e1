"""Training with micro-batches replayed from CUDA graphs (train/graphs.py) against the same
training run eagerly: the same losses and weights after several optimizer steps (a step's first
replay writes the gradients, the others add, and every replay reads the weights re-made after
each step), for BF16, FP8 experts and FP8 everywhere with BF16 weight gradients. Marker gpu."""

import pytest
import torch

from moeray.platform.train import bench_run, zero
from moeray.platform.train import step as tstep
from moeray.platform.train.bench_common import BenchConfig, bigram_stream
from moeray.platform.train.graphs import MicrobatchGraph
from tests.gpu.test_train_one_gpu import CFG, DEV  # tiny, every FP8 GEMM's K a multiple of 128

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
STEPS, MICRO = 3, 3


def _train(graphs: bool, fp8: bool, scope: str, tokens_SMBT: torch.Tensor):
    """STEPS optimizer steps of MICRO micro-batches, the bench's model and step; per-step losses,
    the final weights and the model (with its graph runner)."""
    cfg = BenchConfig(device="cuda", pp=1, fp8_scope=scope)
    model = bench_run.build_model(cfg, CFG, fp8, False, DEV, bf16_wgrad=fp8)
    # lr 1e-2: each step moves the loss by ~0.1 (up, on this tiny model), so a replay reading
    # last step's weights (a WeightCache entry not re-made) would miss the eager losses by far
    # more than the 1e-3 the comparisons allow
    optim = tstep.OptimConfig(lr=1e-2, warmup_steps=1, total_steps=STEPS, moments_dtype="bfloat16")
    opt = zero.build_optimizer(model, optim)
    loss_cfg = tstep.LossConfig()
    graph = MicrobatchGraph(model, loss_cfg, MICRO, DEV) if graphs else None
    losses = []
    for step in range(STEPS):
        loss_t = torch.zeros((), device=DEV)
        if graph is not None:
            graph.start_step()
        for mb in range(MICRO):
            if graph is not None:
                graph.run(tokens_SMBT[step, mb])
                continue
            with torch.autocast("cuda", dtype=torch.bfloat16):
                parts = tstep.compute_loss(model, tokens_SMBT[step, mb], loss_cfg)
            (parts.total / MICRO).backward()
            loss_t += parts.values_3[0] / MICRO
        losses.append(float(graph.loss_3[0] if graph is not None else loss_t))
        tstep.apply_update(model, opt, step, optim, keep_grads=graph is not None)
        if graph is not None:
            graph.refresh()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, weights, model, graph


@pytest.mark.parametrize(
    "fp8, scope",
    [(False, "all"), (True, "experts"), (True, "all")],
    ids=["bf16", "fp8-experts", "fp8-all-bf16wgrad"],
)
def test_graphed_training_equals_eager(fp8, scope):
    # bigram data (learnable, unlike uniform tokens, on which the loss rises)
    tokens = bigram_stream(CFG.vocab_size, STEPS * MICRO * 2 * 65, 0).view(STEPS, MICRO, 2, 65)
    tokens = tokens.to(DEV)
    want, w_want, _, _ = _train(False, fp8, scope, tokens)
    got, w_got, model, graph = _train(True, fp8, scope, tokens)
    # captured, then replayed: the first micro-batch's graph writes the gradients (a stale sum
    # left from the step before would show below), the others' add into them
    assert graph is not None and graph.first is not None and graph.rest is not None
    # the weights move enough that a replay reading a step-old weight would show in the loss
    assert abs(want[-1] - want[0]) > 0.05, want
    assert got == pytest.approx(want, rel=1e-3)
    for name, w in w_want.items():
        rel = ((w_got[name] - w).norm() / w.norm().clamp(min=1e-12)).item()
        assert rel < 1e-3, (name, rel)
    # a replay now computes what an eager forward of the current weights computes
    graph.start_step()
    graph.run(tokens[0, 0])
    replayed = float(graph.loss_3[0]) * MICRO
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = float(tstep.compute_loss(model, tokens[0, 0], tstep.LossConfig()).values_3[0])
    assert replayed == pytest.approx(eager, rel=1e-3)


def test_a_graph_refuses_another_token_shape_and_a_loss_change_inside_a_step():
    cfg = BenchConfig(device="cuda", pp=1)
    model = bench_run.build_model(cfg, CFG, False, False, DEV)
    graph = MicrobatchGraph(model, tstep.LossConfig(), 1, DEV)
    tokens = torch.randint(0, CFG.vocab_size, (2, 33), device=DEV)
    graph.run(tokens)
    with pytest.raises(ValueError, match=r"tokens \(2, 17\): this graph was captured for "):
        graph.run(tokens[:, :17])
    with pytest.raises(ValueError, match=r"loss config changed inside a step"):
        graph.run(tokens, tstep.LossConfig(mtp_lambda=0.1))
