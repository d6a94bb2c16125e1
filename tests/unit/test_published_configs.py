"""Every published DeepSeek-V3-architecture config loads and matches transformers.

The config.json files of deepseek-ai/DeepSeek-V3 (R1 shares it), moonshotai/Moonlight-16B-A3B and
moonshotai/Kimi-K2-Instruct are below as published (auto_map and
transformers_version left out). Each parses into its preset;
then, shrunk to test size (see `_shrink`: what is kept and what is not), random weights go out both
through transformers' save_pretrained and through our save_model (official FP8 with the MTP layer
where the published config has them), load with load_model, and must give transformers'
DeepseekV3ForCausalLM logits in fp32.
"""

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from moeray.kernels.common import FP8_DTYPE  # noqa: E402
from moeray.platform.checkpoint import load_model, save_model  # noqa: E402
from moeray.platform.config import ModelConfig, preset  # noqa: E402
from moeray.platform.model.quant import FP8Linear  # noqa: E402
from moeray.platform.model.transformer import Transformer  # noqa: E402

_COMMON = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "ep_size": 1,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "kv_lora_rank": 512,
    "moe_layer_freq": 1,
    "norm_topk_prob": True,
    "pretraining_tp": 1,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
}
_FP8 = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}
PUBLISHED = {
    "deepseek_v3": {
        **_COMMON,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "first_k_dense_replace": 3,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "max_position_embeddings": 163840,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048,
        "n_group": 8,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_attention_heads": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 61,
        "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1,
        "q_lora_rank": 1536,
        "quantization_config": _FP8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "topk_group": 4,
        "vocab_size": 129280,
    },
    "moonlight_16b_a3b": {
        **_COMMON,
        "bos_token_id": 163584,
        "eos_token_id": 163585,
        "first_k_dense_replace": 1,
        "hidden_size": 2048,
        "intermediate_size": 11264,
        "max_position_embeddings": 8192,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": 1408,
        "n_group": 1,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_attention_heads": 16,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 27,
        "num_key_value_heads": 16,
        "num_nextn_predict_layers": 0,
        "q_lora_rank": None,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 50000.0,
        "routed_scaling_factor": 2.446,
        "topk_group": 1,
        "vocab_size": 163840,
    },
    "kimi_k2": {
        **_COMMON,
        "bos_token_id": 163584,
        "eos_token_id": 163585,
        "first_k_dense_replace": 1,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "max_position_embeddings": 131072,
        "model_type": "kimi_k2",
        "moe_intermediate_size": 2048,
        "n_group": 1,
        "n_routed_experts": 384,
        "n_shared_experts": 1,
        "num_attention_heads": 64,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 61,
        "num_key_value_heads": 64,
        "num_nextn_predict_layers": 0,
        "q_lora_rank": 1536,
        "quantization_config": _FP8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "rope_theta": 50000.0,
        "routed_scaling_factor": 2.827,
        "topk_group": 1,
        "vocab_size": 163840,
    },
}
# fp32 on both sides with the same weights: only summation order differs (1e-7 relative per op).
# A wrong feature (RoPE base, YaRN ramp, q_lora_rank=None path, shared-expert width, scaling
# factor, group limit) moves the logits by 1e-2 or more.
BOUND = 1e-5


def _shrink(c: ModelConfig) -> ModelConfig:
    """Test size. Shrunk: vocab_size 163840/129280 -> 512, hidden_size -> 64, intermediate_size
    -> 96, moe_intermediate_size -> 16, num_attention_heads -> 2, q_lora_rank -> 48 (null stays
    null), kv_lora_rank -> 32, qk_nope_head_dim and v_head_dim -> 16, num_hidden_layers ->
    first_k_dense_replace + 1 (one MoE layer). Kept as published: the expert counts (256, 64, 384)
    and top-k, n_group/topk_group, n_shared_experts, routed_scaling_factor, qk_rope_head_dim 64 and
    RoPE/YaRN parameters (so the YaRN ramp is the published one), rms_norm_eps, MTP depth and the
    FP8 quantization_config."""
    return c.replace(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=16,
        num_hidden_layers=c.first_k_dense_replace + 1,
        num_attention_heads=2,
        q_lora_rank=None if c.q_lora_rank is None else 48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        v_head_dim=16,
    )


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _hf_config(c: ModelConfig):
    # transformers cannot quantize a random model to FP8 on a CPU (nor load FP8 without
    # accelerate): its side is always the unquantized model.
    hf = c.to_hf()
    return transformers.DeepseekV3Config(
        **{
            k: v
            for k, v in hf.items()
            if k not in ("architectures", "model_type", "quantization_config")
        }
    )


def _positive_biases(moe_gates):
    # Positive correction biases: transformers' group mask (0.0) and the official one (-inf) then
    # choose the same experts (docs/deepseek-v3.md, "Gate").
    with torch.no_grad():
        for bias in moe_gates:
            bias.uniform_(0.0, 0.05)


def _hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _dequantized_copy(src, dst, c: ModelConfig):
    """An unquantized copy of our FP8 directory for transformers, dequantized here from the files
    (W * scale_inv per 128x128 block, written out independently of moeray's dequantizer); the MTP
    layer is dropped (transformers has none)."""
    dst.mkdir()
    out = {}
    for f in sorted(src.glob("model-*.safetensors")):
        out.update(load_file(str(f)))
    for key in [k for k in out if k.endswith("_scale_inv")]:
        s = out.pop(key)
        w_key = key[: -len("_scale_inv")]
        w = out[w_key].to(torch.float64)
        n, k = w.shape
        block = s.to(torch.float64).repeat_interleave(128, 0).repeat_interleave(128, 1)
        out[w_key] = (w * block[:n, :k]).to(torch.float32)
    L = c.num_hidden_layers
    out = {
        k: v
        for k, v in out.items()
        if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= L)
    }
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = c.replace(quantization_config=None, num_nextn_predict_layers=0).to_hf()
    (dst / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_parses_into_its_preset(name):
    c = ModelConfig.from_hf(PUBLISHED[name])
    assert c == preset(name)
    # The features each one exercises.
    assert (c.q_lora_rank is None) == (name == "moonlight_16b_a3b")
    assert c.n_group == (8 if name == "deepseek_v3" else 1)
    assert c.num_nextn_predict_layers == (1 if name == "deepseek_v3" else 0)
    assert (c.quantization_config is not None) == (name != "moonlight_16b_a3b")
    # Our config.json parses back to the same config.
    assert ModelConfig.from_hf(json.loads(json.dumps(c.to_hf()))) == c


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_transformers_saves_we_load(name, tmp_path):
    c = _shrink(preset(name))
    torch.manual_seed(10)
    hf = transformers.DeepseekV3ForCausalLM(_hf_config(c)).eval()
    _positive_biases(
        layer.mlp.gate.e_score_correction_bias
        for layer in hf.model.layers[c.first_k_dense_replace :]
    )
    hf.save_pretrained(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, ours = load_model(tmp_path)
    # V3's config keeps num_nextn_predict_layers 1 without MTP weights: loaded without, one warning.
    assert len([w for w in caught if "holds no MTP weights" in str(w.message)]) == (
        c.num_nextn_predict_layers
    )
    assert config.replace(num_nextn_predict_layers=c.num_nextn_predict_layers) == c.replace(
        quantization_config=None
    )
    ids = torch.randint(0, c.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rel = _rel(ours(ids).logits, hf(ids).logits)
    assert rel < BOUND, rel


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_we_save_transformers_loads(name, tmp_path):
    c = _shrink(preset(name))
    fp8 = c.quantization_config is not None
    model = Transformer(c).eval()
    model.reset_parameters(seed=11)
    _positive_biases(m.gate.e_score_correction_bias for m in model.moe_layers())
    save_model(model, c, tmp_path / "ours", fp8=fp8)
    config, ours = load_model(tmp_path / "ours")
    assert config == c and len(ours.mtp) == c.num_nextn_predict_layers
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    L = c.num_hidden_layers
    if c.num_nextn_predict_layers:  # the official layout: MTP as layer L, its own FP8 weights
        assert f"model.layers.{L}.eh_proj.weight" in index["weight_map"]
        assert f"model.layers.{L}.mlp.experts.255.up_proj.weight_scale_inv" in index["weight_map"]
    if fp8:
        ref_dir = tmp_path / "dequantized"
        _dequantized_copy(tmp_path / "ours", ref_dir, c)
        shard = load_file(str(next((tmp_path / "ours").glob("model-*.safetensors"))))
        assert shard["model.layers.0.self_attn.kv_b_proj.weight"].dtype == FP8_DTYPE
    else:
        ref_dir = tmp_path / "ours"
    hf = _hf_load(ref_dir)
    ids = torch.randint(0, c.vocab_size, (2, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf(ids).logits
        rel = _rel(ours(ids).logits, theirs)
        assert rel < BOUND, rel
        if not fp8:  # our own model before the round trip gives the same logits
            assert _rel(model(ids).logits, theirs) < BOUND
        else:  # and kept in FP8 the same numbers (dequantized per use on a CPU)
            _, kept = load_model(tmp_path / "ours", keep_fp8=True)
            assert isinstance(kept.model.layers[0].self_attn.kv_b_proj, FP8Linear)
            assert _rel(kept(ids).logits, theirs) < BOUND
