"""One-process training's plain linear layers as split linears (`weight_grad.enable_split_linears`,
called by `moeray bench train --pp 1` and the PP = 1 replica): the swapped model trains exactly as
the nn.Linear one over two optimizer steps of two micro-batches each (fp32, CPU bf16 autocast, FP8),
which also proves each layer's cached bf16 cast is remade after the optimizer step; the same
Parameters under the same names; checkpoints save and load; MOERAY_FUSED_LINEAR_WGRAD=0 keeps
nn.Linear; and where the fp32-out weight gradient (CUDA only, tests/gpu/test_linear_wgrad_gpu.py)
is chosen."""

import pytest
import torch
from torch import nn

from moeray.platform.checkpoint import load_model, save_model
from moeray.platform.config import tiny
from moeray.platform.fp8 import FP8TrainLinear, enable_fp8_training
from moeray.platform.model.transformer import Transformer
from moeray.platform.parallel.experts_mlp import enable_grouped_experts
from moeray.platform.parallel.weight_grad import (
    SplitLinear,
    enable_split_linears,
    use_fused_linear_wgrad,
)
from moeray.platform.train import bench_run
from moeray.platform.train import step as ts
from moeray.platform.train.bench_common import BenchConfig
from moeray.platform.train.job_config import TrainJobConfig
from moeray.platform.train.replica import Groups, parallelize

ONE = Groups(rank=0, world=1, ep_rank=0, ep_size=1, dp_rank=0, ep_group=None, dp_group=None)
# Without MTP every weight is read once per forward: the two models' products are the same bf16
# GEMMs, so their results are bit-identical (with MTP: test_head_shared_with_mtp_...).
NO_MTP = tiny().replace(num_nextn_predict_layers=0)


@pytest.fixture
def one_thread():
    """One intra-op thread: both runs sum every product in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _model(cfg, fp8: bool, swap: bool) -> Transformer:
    model = Transformer(cfg)
    model.reset_parameters(seed=0)
    if fp8:
        enable_fp8_training(model)
    enable_grouped_experts(model, grouped_fp8=False)  # as bench_run.build_model on the CPU
    if swap:
        assert enable_split_linears(model) > 0
    return model.train()


def _train(model: Transformer, autocast: bool, steps: int = 2, microbatches: int = 2):
    """Per step: its micro-batches' losses and the accumulated gradients, then an AdamW step (lr
    1e-2: every weight moves by ~1e-2, half its init std; a layer still using its old bf16 cast
    would give other losses and gradients in the next step)."""
    opt = ts.build_optimizer(model, ts.OptimConfig(lr=1e-2, warmup_steps=1, total_steps=steps))
    tokens = torch.randint(
        0,
        model.config.vocab_size,
        (steps, microbatches, 2, 17),
        generator=torch.Generator().manual_seed(1),
    )
    out = []
    for step in range(steps):
        losses = []
        for mb in range(microbatches):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                parts = ts.compute_loss(model, tokens[step, mb], ts.LossConfig())
            (parts.total / microbatches).backward()
            losses.append(parts.main)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out.append((losses, grads))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize(
    "autocast,fp8", [(False, False), (True, False), (True, True)], ids=["fp32", "bf16", "fp8"]
)
def test_swapped_model_trains_exactly_as_nn_linear(one_thread, autocast, fp8):
    want = _train(_model(NO_MTP, fp8, swap=False), autocast)
    got = _train(_model(NO_MTP, fp8, swap=True), autocast)
    for step, ((l_want, g_want), (l_got, g_got)) in enumerate(zip(want, got, strict=True)):
        assert l_got == l_want, step
        assert g_got.keys() == g_want.keys() and len(g_want) > 40
        for name, g in g_want.items():
            assert g_got[name].dtype == torch.float32, name
            assert torch.equal(g_got[name], g), (step, name)
    # the optimizer step moved the weights: step 2 is not step 1 again
    assert want[1][0] != want[0][0]


def test_head_shared_with_mtp_sums_its_gradient_in_fp32(one_thread):
    """With MTP the head runs twice per forward. Under autocast nn.Linear's two uses share one
    cached bf16 cast of the weight, so autograd sums their dW in bf16 before the cast to fp32;
    the split head returns each dW in fp32 and autograd sums those. The losses are equal, the
    gradients within one bf16 rounding (2^-8 relative)."""
    ((l_want, g_want),) = _train(_model(tiny(), False, swap=False), True, steps=1)
    ((l_got, g_got),) = _train(_model(tiny(), False, swap=True), True, steps=1)
    assert l_got == l_want
    assert g_got.keys() == g_want.keys()
    for name, g in g_want.items():
        bound = 2**-8 * g.abs().max().item()
        assert (g_got[name] - g).abs().max().item() <= bound, name


@pytest.mark.parametrize("fp8", [False, True])
def test_swap_shares_parameters_names_and_keeps_fp8(fp8):
    model = _model(tiny(), fp8, swap=False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, FP8TrainLinear))}
    keys = list(model.state_dict().keys())
    params = dict(model.named_parameters())
    head = model.lm_head.weight
    assert enable_split_linears(model) == len(linears) > 20
    assert list(model.state_dict().keys()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    assert model.lm_head.weight is head  # what the checkpoint reads (hf_state_dict)
    for name, old in linears.items():
        new = model.get_submodule(name)
        assert isinstance(new, SplitLinear) and new.store is None, name
        assert new.weight is old.weight and new.bias is old.bias, name
        assert new.fp8 == isinstance(old, FP8TrainLinear), name
    assert not any(isinstance(m, (nn.Linear, FP8TrainLinear)) for m in model.modules())
    assert model.lm_head.fp8 is False  # the head is never FP8
    assert enable_split_linears(model) == 0  # nothing left to swap


def test_module_shared_by_two_parents_stays_one_module():
    lin = nn.Linear(4, 3)
    root = nn.Module()
    root.a, root.b = nn.Sequential(lin), nn.Sequential(lin)
    assert enable_split_linears(root) == 1
    assert root.a[0] is root.b[0] and isinstance(root.a[0], SplitLinear)


def test_switch_off_keeps_nn_linear(monkeypatch):
    monkeypatch.setenv("MOERAY_FUSED_LINEAR_WGRAD", "0")
    model = Transformer(tiny())
    assert enable_split_linears(model) == 0
    assert isinstance(model.lm_head, nn.Linear)
    cfg = BenchConfig(model="tiny", device="cpu", pp=1)
    built = bench_run.build_model(cfg, tiny(), False, False, torch.device("cpu"))
    assert not any(isinstance(m, SplitLinear) for m in built.modules())


@pytest.mark.parametrize("fp8", [False, True])
def test_bench_and_one_rank_replica_build_split_linears(monkeypatch, fp8):
    monkeypatch.delenv("MOERAY_FUSED_LINEAR_WGRAD", raising=False)
    cfg = BenchConfig(model="tiny", device="cpu", pp=1, fp8_scope="all")
    bench_model = bench_run.build_model(cfg, tiny(), fp8, False, torch.device("cpu"))
    job = TrainJobConfig.from_dict({"fp8": fp8, "fp8_scope": "all"})
    replica_model = parallelize(Transformer(tiny()), job, ONE, torch.device("cpu"))
    if fp8:  # the default scope, the routed experts: every split linear stays BF16
        default = parallelize(
            Transformer(tiny()), TrainJobConfig.from_dict({"fp8": True}), ONE, torch.device("cpu")
        )
        assert not any(m.fp8 for m in default.modules() if isinstance(m, SplitLinear))
    for model in (bench_model, replica_model):
        splits = [m for m in model.modules() if isinstance(m, SplitLinear)]
        assert splits and not any(
            isinstance(m, (nn.Linear, FP8TrainLinear)) for m in model.modules()
        )
        # FP8 runs of scope all keep the attention and MLP projections in FP8; the head and
        # eh_proj stay BF16
        assert any(m.fp8 for m in splits) == fp8
        assert not model.lm_head.fp8


def test_swapped_model_saves_and_loads(tmp_path):
    model = _model(tiny(), False, swap=True)
    with torch.no_grad():  # weights that differ from any fresh init
        for p in model.parameters():
            p.add_(0.01)
    save_model(model, tiny(), tmp_path / "m")
    _, loaded = load_model(tmp_path / "m")
    want = model.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    for k, t in loaded.state_dict().items():
        assert torch.equal(t, want[k]), k
    # and back into a swapped model, in place (the layers' caches then see the new versions)
    fresh = _model(tiny(), False, swap=True)
    fresh.load_state_dict(loaded.state_dict())
    tokens = torch.randint(0, tiny().vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = ts.compute_loss(model, tokens, ts.LossConfig()).main
        b = ts.compute_loss(fresh, tokens, ts.LossConfig()).main
    assert a == b


def test_fused_linear_wgrad_chooser(monkeypatch):
    """One place decides: CUDA only (torch has no CPU mm/addmm with out_dtype), a process alone
    (no process group here), and MOERAY_FUSED_LINEAR_WGRAD=0 switches it off."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv("MOERAY_FUSED_LINEAR_WGRAD", raising=False)
    assert use_fused_linear_wgrad(cuda) and not use_fused_linear_wgrad(cpu)
    monkeypatch.setenv("MOERAY_FUSED_LINEAR_WGRAD", "0")
    assert not use_fused_linear_wgrad(cuda)


def test_split_linear_saves_its_input_in_the_autocast_dtype():
    """Under bf16 autocast an fp32 input (the norms' outputs) is kept for the backward as the bf16
    the GEMMs read, as F.linear's autocast cast is: half the bytes, no second cast in the backward;
    the input's gradient still comes back fp32."""
    w = nn.Parameter(torch.randn(6, 8))
    layer = SplitLinear(w, None, None, fp8=False)
    x = torch.randn(5, 8, requires_grad=True)
    saved: list[torch.dtype] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
    assert y.dtype == torch.bfloat16 and saved == [torch.bfloat16, torch.float32]
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert w.grad is not None and w.grad.dtype == torch.float32
