"""One expert-parallel rank's weights: read shard-wise from the safetensors files (only its experts
and the replicated tensors, bytes counted), or random of the right shapes (dummy)."""

import pytest
import torch
from safetensors import safe_open

from moeray.platform.checkpoint import load_model, save_model
from moeray.platform.config import tiny
from moeray.platform.model.transformer import Transformer
from moeray.platform.rank_weights import load_rank_model, rank_experts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(3)
    d = tmp_path_factory.mktemp("tiny")
    # Small shards: experts of one layer spread over several files.
    save_model(Transformer(tiny()), tiny(), d, max_shard_bytes=64 * 1024)
    return d


def _file_bytes(model_dir) -> tuple[int, int]:
    """(all tensor bytes, routed-expert tensor bytes) in the directory's safetensors files."""
    total = experts = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                n = t.numel() * t.element_size()
                total += n
                experts += n if ".mlp.experts." in k else 0
    return total, experts


@pytest.mark.parametrize("ep", [2, 4])
def test_each_rank_reads_only_its_share(model_dir, ep):
    assert len(list(model_dir.glob("*.safetensors"))) > 3
    total, expert_bytes = _file_bytes(model_dir)
    _cfg, full = load_model(model_dir)
    E = tiny().n_routed_experts
    for rank in range(ep):
        _cfg, model, report = load_rank_model(model_dir, rank, ep)
        # Exactly the replicated tensors and this rank's 1/ep of the experts' bytes.
        assert report.bytes_read == total - expert_bytes + expert_bytes // ep
        assert report.experts == (rank * E // ep, (rank + 1) * E // ep)
        lo, hi = report.experts
        for name, t in model.state_dict().items():
            ref = full.state_dict()[name]
            if name.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")):
                assert t.shape[0] == E // ep
                ref = ref[lo:hi]
            assert torch.equal(t, ref), name
        assert all(m.experts.num_experts == E // ep for m in model.moe_layers())
        assert report.peak_host_bytes > 0


def test_dummy_weights_have_the_shapes_and_replicate_dense_parts(model_dir):
    E = tiny().n_routed_experts
    ranks = [load_rank_model(model_dir, r, 2, load_format="dummy") for r in range(2)]
    (_, m0, r0), (_, m1, _r1) = ranks
    assert r0.bytes_read == 0 and r0.load_format == "dummy"
    _cfg, full = load_model(model_dir)
    s0, s1, sf = m0.state_dict(), m1.state_dict(), full.state_dict()
    assert set(s0) == set(sf)
    for name, t in s0.items():
        expert = name.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj"))
        shape = (E // 2, *sf[name].shape[1:]) if expert else sf[name].shape
        assert t.shape == shape and t.dtype == sf[name].dtype, name
        assert torch.isfinite(t).all(), name
        if expert:
            assert not torch.equal(t, s1[name]), name  # each rank its own experts
        else:
            assert torch.equal(t, s1[name]), name  # replicated: the same on every rank
    w = s0["model.layers.0.self_attn.q_a_proj.weight"]
    assert 0.5 * tiny().initializer_range < w.std() < 2 * tiny().initializer_range


def test_bad_shard_requests_are_refused(model_dir):
    with pytest.raises(ValueError, match="ep_size=3"):
        rank_experts(tiny(), 0, 3)
    with pytest.raises(ValueError, match="at ep_rank=2"):
        load_rank_model(model_dir, 2, 2)
    with pytest.raises(ValueError, match="load_format='pt'"):
        load_rank_model(model_dir, 0, 2, load_format="pt")


def test_fp8_checkpoint_stays_fp8_per_rank_and_dummy_fp8_has_its_layout(tmp_path):
    torch.manual_seed(4)
    d = save_model(
        Transformer(tiny()), tiny(), tmp_path / "fp8", fp8=True, max_shard_bytes=64 * 1024
    )
    total, expert_bytes = _file_bytes(d)  # e4m3 weights and their scales
    _cfg, full = load_model(d, keep_fp8=True)
    _cfg, shard, report = load_rank_model(d, 1, 2, keep_fp8=True)
    assert report.bytes_read == total - expert_bytes + expert_bytes // 2
    _cfg, dummy, dreport = load_rank_model(d, 1, 2, load_format="dummy", keep_fp8=True)
    assert dreport.bytes_read == 0
    E = tiny().n_routed_experts
    sf, ss, sd = full.state_dict(), shard.state_dict(), dummy.state_dict()
    assert set(ss) == set(sf) == set(sd)
    fp8_keys = [k for k, t in sf.items() if t.dtype == torch.float8_e4m3fn]
    assert any(".experts." in k for k in fp8_keys) and any("self_attn" in k for k in fp8_keys)
    for k, ref in sf.items():
        expert = ".experts." in k and not k.endswith("bias")
        want = ref[E // 2 :] if expert else ref
        assert torch.equal(ss[k].float(), want.float()), k  # the real shard: the same bytes
        assert sd[k].shape == want.shape and sd[k].dtype == want.dtype, k  # dummy: the layout
    for k in fp8_keys:  # dummy e4m3 blocks dequantize to Normal(0, initializer_range)
        if k.endswith("q_a_proj.weight"):
            w = dummy.get_submodule(k.rsplit(".", 1)[0]).dequantized_weight(torch.float32)
            assert 0.5 * tiny().initializer_range < w.std() < 2 * tiny().initializer_range
