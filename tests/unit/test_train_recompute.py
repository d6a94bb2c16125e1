"""Recompute in the backward (`recompute: [norm, mla_up]`, train/recompute.py) as `parallelize`
applies it: the gradients equal those without recompute (fp32 tiny model), the parameters and state
dict are unchanged, and the forward keeps measurably fewer activation bytes, counted two ways:
what autograd saves for the backward (saved_tensors_hooks), and every tensor made in the forward
that is still alive when the backward starts (this also counts what a recomputed piece keeps)."""

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moeray.platform.config import tiny
from moeray.platform.model.transformer import Transformer
from moeray.platform.train import step as ts
from moeray.platform.train.job_config import TrainJobConfig
from moeray.platform.train.recompute import apply_recompute
from moeray.platform.train.replica import Groups, parallelize

ONE = Groups(rank=0, world=1, ep_rank=0, ep_size=1, dp_rank=0, ep_group=None, dp_group=None)


class _Made(TorchDispatchMode):
    """Weak references to the storage of every tensor an op makes."""

    def __init__(self) -> None:
        super().__init__()
        self.made: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.made[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
        return out

    def alive_bytes(self, exclude: set[int]) -> int:
        return sum(
            n for ptr, (ref, n) in self.made.items() if ptr not in exclude and not ref.expired()
        )


def _run(recompute: tuple[str, ...], tokens):
    job = TrainJobConfig.from_dict({"recompute": list(recompute)})
    model = Transformer(tiny())
    model.reset_parameters(seed=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero biases: every expert path runs
        for m in ts.moe_layers(model):
            m.gate.e_score_correction_bias.copy_(
                0.1 * torch.randn(tiny().n_routed_experts, generator=g)
            )
    model = parallelize(model, job, ONE, torch.device("cpu"))
    saved: dict[int, int] = {}  # storage -> bytes that autograd keeps for the backward
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:  # activations only
            saved[st.data_ptr()] = st.nbytes()
        return t

    made = _Made()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), made:
        parts = ts.compute_loss(model, tokens, ts.LossConfig())
    alive = made.alive_bytes(exclude=weights)
    parts.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return parts, grads, sum(saved.values()), alive, model


@pytest.fixture(scope="module")
def runs():
    tokens = torch.randint(0, 1024, (2, 33), generator=torch.Generator().manual_seed(0))
    cases = {"none": (), "norm": ("norm",), "mla_up": ("mla_up",), "both": ("norm", "mla_up")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only spins on a shared 2-core machine
    try:
        return {name: _run(pieces, tokens) for name, pieces in cases.items()}
    finally:
        torch.set_num_threads(threads)


def test_gradients_equal_no_recompute(runs):
    base_parts, base, _, _, base_model = runs["none"]
    for name in ("norm", "mla_up", "both"):
        parts, grads, _, _, model = runs[name]
        assert parts.main == base_parts.main and parts.mtp == base_parts.mtp
        assert grads.keys() == base.keys() and len(grads) > 20
        for k, g in base.items():
            torch.testing.assert_close(grads[k], g, rtol=1e-6, atol=1e-9, msg=f"{name}: {k}")
        # wrapped from outside: the same parameters under the same names
        assert model.state_dict().keys() == base_model.state_dict().keys()


def test_recompute_keeps_fewer_activation_bytes(runs):
    _, _, saved0, alive0, _ = runs["none"]
    _, _, saved_n, alive_n, _ = runs["norm"]
    _, _, saved_m, alive_m, _ = runs["mla_up"]
    _, _, saved_b, alive_b, _ = runs["both"]
    cfg, T = tiny(), 2 * 32
    blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers  # decoder layers with an MLA
    # norm: at least the fp32 normalized [T, D] copy of the two pre-norms of every block
    norm_least = blocks * 2 * T * cfg.hidden_size * 4
    # mla_up: at least the per-head q and k (N + R each) and kv_b_proj's k_nope | v (N + V)
    H, N, R, V = (
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
    )
    mla_least = blocks * T * H * (2 * (N + R) + N + V) * 4
    for name, least, saved, alive in (
        ("norm", norm_least, saved_n, alive_n),
        ("mla_up", mla_least, saved_m, alive_m),
        ("both", norm_least + mla_least, saved_b, alive_b),
    ):
        assert saved0 - saved >= least and alive0 - alive >= least, (
            name,
            saved0 - saved,
            alive0 - alive,
            least,
        )


def test_apply_recompute_wraps_every_norm_and_mla():
    model = Transformer(tiny())
    n_norm = sum(type(m).__name__ == "RMSNorm" for m in model.modules())
    n_mla = sum(type(m).__name__ == "MLA" for m in model.modules())
    assert apply_recompute(model, ("norm", "mla_up")) == n_norm + n_mla
    # no grad (evaluation, serving): plain calls, same outputs
    ids = torch.randint(0, 1024, (1, 9))
    ref = Transformer(tiny())
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_bad_recompute_is_refused():
    with pytest.raises(ValueError, match="\\['attn'\\] unknown; accepted: \\('norm', 'mla_up'\\)"):
        TrainJobConfig.from_dict({"recompute": ["norm", "attn"]})
    with pytest.raises(ValueError, match=r"need parallel\.pp=1"):
        TrainJobConfig.from_dict({"recompute": ["norm"], "parallel": {"pp": 2, "microbatches": 4}})
