import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeray.kernels.common import FP8_DTYPE
from moeray.platform.checkpoint import load_model, save_model
from moeray.platform.config import tiny
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model import quant
from moeray.platform.model.mla import DenseKVCache
from moeray.platform.model.quant import FP8Linear, dequantize_fp8_blocks, quantize_fp8_blocks
from moeray.platform.model.transformer import Transformer

# e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 per element (half an ulp); block
# scaling puts the largest element of each block at 448, so small elements lose more.
E4M3_REL = 2**-4


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Transformer(tiny()).eval()


def test_round_trip_is_exact_with_sharding_and_index(tiny_model, tmp_path):
    save_model(tiny_model, tiny(), tmp_path, max_shard_bytes=300_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / s).exists() for s in shards)
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in index["weight_map"]
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in index["weight_map"]
    for name in (
        "enorm",
        "hnorm",
        "eh_proj",
        "shared_head.norm",
        "shared_head.head",
        "embed_tokens",
    ):
        assert f"model.layers.3.{name}.weight" in index["weight_map"], name
    _, loaded = load_model(tmp_path)
    for (k, a), (k2, b) in zip(
        tiny_model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b), k


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (7, 300), (3, 129, 64)])
def test_block_quantization_error_and_odd_shapes(shape):
    torch.manual_seed(3)
    w = torch.randn(shape)
    q, s = quantize_fp8_blocks(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.shape[-2:] == (-(-shape[-2] // 128), -(-shape[-1] // 128))
    back = dequantize_fp8_blocks(q, s)
    err = (back - w).abs()
    # Per element: half an ulp of e4m3 at the element's binade, or the subnormal step of its block.
    block_amax = (
        s.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., : shape[-2], : shape[-1]] * 448
    )
    bound = torch.maximum(w.abs() * E4M3_REL, block_amax / 448 * 2**-9)
    assert bool((err <= bound * 1.0001).all())
    assert float((back - w).norm() / w.norm()) < 0.04
    with pytest.raises(ValueError, match="scale_inv shape"):
        dequantize_fp8_blocks(q, s[..., :-1, :] if s.shape[-2] > 1 else s[..., :, :0])


def test_fp8_save_load_dequantized_and_kept(tiny_model, tmp_path):
    save_model(tiny_model, tiny(), tmp_path, fp8=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    tensors = {}
    for f in tmp_path.glob("model-*.safetensors"):
        tensors.update(load_file(str(f)))
    assert tensors["model.layers.0.self_attn.q_a_proj.weight"].dtype == FP8_DTYPE
    assert tensors["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"].dtype == torch.float32
    assert (
        tensors["model.embed_tokens.weight"].dtype == torch.float32
    )  # embedding, head, gate, norms stay
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32

    # Seeded, and 256 tokens: with the global RNG and 22 tokens the error depended on which tests
    # ran before (0.039-0.051 over seeds, so the test failed when run alone); over 256 tokens it
    # is 0.037-0.047.
    ids = torch.randint(0, 1024, (8, 32), generator=torch.Generator().manual_seed(0))
    _, deq = load_model(tmp_path)
    _, kept = load_model(tmp_path, keep_fp8=True)
    assert isinstance(kept.model.layers[0].self_attn.kv_b_proj, FP8Linear)
    assert kept.model.layers[1].mlp.experts.up_proj.dtype == FP8_DTYPE
    with torch.no_grad():
        ref, a, b = tiny_model(ids).logits, deq(ids).logits, kept(ids).logits
    assert torch.allclose(a, b, atol=1e-6)  # same dequantized numbers either way
    rel = float((a - ref).norm() / ref.norm())
    assert 1e-4 < rel < 0.05, rel  # FP8 changed the numbers, within e4m3 error
    # Saving a model that keeps FP8 writes the same FP8 bytes back.
    save_model(kept, tiny(), tmp_path / "again")
    again = {}
    for f in (tmp_path / "again").glob("model-*.safetensors"):
        again.update(load_file(str(f)))
    key = "model.layers.2.mlp.experts.0.down_proj.weight"
    assert torch.equal(again[key].view(torch.uint8), tensors[key].view(torch.uint8))


def test_mismatched_and_unexpected_tensors_are_named(tiny_model, tmp_path):
    save_model(tiny_model, tiny(), tmp_path)
    shard = next(tmp_path.glob("model-*.safetensors"))
    t = load_file(str(shard))
    t["model.norm.weight"] = torch.ones(65)
    t["model.layers.0.mlp.bogus.weight"] = torch.ones(2)
    del t["model.layers.1.mlp.experts.7.gate_proj.weight"]
    save_file(t, str(shard))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.bogus.weight"] = shard.name
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert "model.norm.weight: checkpoint (65,) vs model (64,)" in msg
    assert "model.layers.0.mlp.bogus.weight" in msg
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in msg


def test_tokenizer_files_are_written(tiny_model, tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    save_model(tiny_model, tiny(), tmp_path, tokenizer=tok)
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab()["b"] == 1
    with pytest.raises(ValueError, match="no tokenizer files"):
        save_model(
            tiny_model, tiny(), tmp_path / "x", tokenizer=tmp_path / "empty_dir_that_is_missing"
        )


def test_kept_fp8_with_a_kv_cache_matches_dequantized(tiny_model, tmp_path, monkeypatch):
    # The absorbed MLA path (every forward with a cache) reads kv_b_proj as a matrix; kept in FP8
    # it must use the block scales (reading the raw e4m3 gave 1.2 relative error).
    save_model(tiny_model, tiny(), tmp_path, fp8=True)
    _, deq = load_model(tmp_path)
    _, kept = load_model(tmp_path, keep_fp8=True)
    kv_b = kept.model.layers[0].self_attn.kv_b_proj
    assert isinstance(kv_b, FP8Linear)
    calls = []
    real = quant.dequantize_fp8_blocks

    def counting(q, s, *args, **kwargs):
        calls.append(tuple(q.shape))
        return real(q, s, *args, **kwargs)

    monkeypatch.setattr(quant, "dequantize_fp8_blocks", counting)
    ids = torch.randint(0, 1024, (2, 11), generator=torch.Generator().manual_seed(4))
    logits = {}
    for name, model in (("deq", deq), ("kept", kept)):
        cache = DenseKVCache(3, 2, 11, tiny())
        with torch.no_grad():
            parts = [model(ids[:, :6], cache=cache).logits]  # prefill, then 5 decode steps
            parts += [model(ids[:, s : s + 1], cache=cache).logits for s in range(6, 11)]
        logits[name] = torch.cat(parts, dim=1)
    rel = float((logits["kept"] - logits["deq"]).norm() / logits["deq"].norm())
    assert rel < 1e-5, rel  # on a CPU FP8Linear dequantizes too: the same numbers
    # kv_b_proj dequantized once per layer for the 6 forwards (cached), not once per step.
    assert calls.count(tuple(kv_b.weight.shape)) == tiny().num_hidden_layers
    # Through the engine (paged cache, the same absorbed path): the same greedy tokens.
    params = SamplingParams(temperature=0, max_tokens=6)
    prompts = [ids[0, :7].tolist(), ids[1, :3].tolist()]
    outs = {}
    for name, model in (("deq", deq), ("kept", kept)):
        engine = Engine(model, EngineConfig(num_pages=8, page_size=16))
        outs[name] = [o.output_token_ids for o in engine.generate(prompts, params)]
    assert outs["kept"] == outs["deq"]
