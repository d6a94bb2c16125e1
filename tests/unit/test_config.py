import json

import pytest

from moeray.platform.config import ModelConfig, deepseek_v3, preset, small, tiny


def test_v3_numbers_match_reference():
    c = deepseek_v3()
    # docs/deepseek-v3.md, "Model config": 671B total, ~37B activated, 70,272 bytes of latent
    # cache per token.
    assert round(c.num_parameters() / 1e9) == 671
    assert 36.5e9 < c.num_parameters(activated=True) < 38e9
    assert c.kv_cache_bytes_per_token == 70272
    assert c.qk_head_dim == 192
    # YaRN factor 40, mscale_all_dim 1: softmax scale = 192^-0.5 * (0.1 ln 40 + 1)^2
    assert c.softmax_scale == pytest.approx(192**-0.5 * (0.1 * 3.6888794541139363 + 1) ** 2)


def test_small_is_half_to_one_billion_and_keeps_v3_latent():
    c = small()
    assert 0.5e9 <= c.num_parameters(include_mtp=True) <= 1.0e9
    assert (c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim) == (
        512,
        64,
        128,
        128,
    )


def test_official_config_json_round_trip():
    official = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": 7168,
        "num_hidden_layers": 61,
        "n_routed_experts": 256,
        "n_group": 8,
        "topk_group": 4,
        "kv_lora_rank": 512,
        "num_nextn_predict_layers": 1,
        "rope_theta": 10000,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        },
        "some_unknown_field": 3,
    }
    c = ModelConfig.from_hf(official)
    assert c == deepseek_v3()
    assert ModelConfig.from_hf(json.loads(json.dumps(c.to_hf()))) == c


def test_transformers5_rope_parameters_accepted():
    hf5 = tiny().to_hf()
    rope = hf5.pop("rope_scaling")
    hf5.pop("rope_theta")
    hf5["rope_parameters"] = {**rope, "rope_type": "yarn", "rope_theta": 5000.0}
    c = ModelConfig.from_hf(hf5)
    assert c.rope_theta == 5000.0 and c.rope_scaling["factor"] == rope["factor"]


def test_from_hf_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny().to_hf()))
    assert ModelConfig.from_hf(tmp_path) == tiny()
    with pytest.raises(ValueError, match=r"no config\.json"):
        ModelConfig.from_hf(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"n_group": 5}, "n_group=5"),
        ({"topk_group": 9, "n_group": 4}, "topk_group=9"),
        ({"num_experts_per_tok": 100}, "num_experts_per_tok=100"),
        ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
        ({"hidden_size": 0}, "hidden_size=0"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim=7"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "'dynamic'"),
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}},
            r"\[64, 64\]",
        ),
    ],
)
def test_bad_config_names_the_value(change, match):
    with pytest.raises(ValueError, match=match):
        tiny().replace(**change)


def test_preset_lookup():
    assert preset("tiny") == tiny()
    with pytest.raises(ValueError, match="'huge'"):
        preset("huge")
