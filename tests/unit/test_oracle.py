"""Our model against transformers' DeepseekV3ForCausalLM, the independent oracle, in fp32.

Both directions: we save and transformers loads; transformers builds and saves and we load. A
tiny random config with YaRN, q/kv LoRA, a dense first layer, groups and a shared expert."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from moeray.platform.checkpoint import load_model, save_model  # noqa: E402
from moeray.platform.config import tiny  # noqa: E402
from moeray.platform.engine.engine import Engine, EngineConfig  # noqa: E402
from moeray.platform.engine.sampler import SamplingParams  # noqa: E402
from moeray.platform.model.transformer import Transformer, greedy_generate  # noqa: E402


def _hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def ours_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    with torch.no_grad():
        for (
            moe
        ) in model.moe_layers():  # positive biases: both mask conventions agree (see test_model)
            moe.gate.e_score_correction_bias.uniform_(0.0, 0.05)
    path = tmp_path_factory.mktemp("ours")
    save_model(model, tiny(), path, max_shard_bytes=400_000)  # several shards + index
    return model, path


def test_we_save_transformers_loads(ours_dir):
    model, path = ours_dir
    hf = _hf_load(path)
    ids = torch.randint(0, 1024, (3, 21))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert _rel(ours, theirs) < 1e-5
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_transformers_saves_we_load(tmp_path):
    c = tiny().replace(num_nextn_predict_layers=0)  # transformers' model has no MTP weights
    hf_config = transformers.DeepseekV3Config(
        **{k: v for k, v in c.to_hf().items() if k not in ("architectures", "model_type")}
    )
    torch.manual_seed(1)
    hf = transformers.DeepseekV3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for layer in hf.model.layers[c.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.uniform_(0.0, 0.05)
    hf.save_pretrained(str(tmp_path))
    config, ours = load_model(tmp_path)
    assert config.num_hidden_layers == c.num_hidden_layers and config.rope_scaling["factor"] == 4
    ids = torch.randint(0, 1024, (2, 19))
    with torch.no_grad():
        assert _rel(ours(ids).logits, hf(ids).logits) < 1e-5


def test_greedy_generation_matches_transformers(ours_dir):
    model, path = ours_dir
    hf = _hf_load(path)
    ids = torch.randint(2, 1024, (2, 7))
    ours = greedy_generate(model, ids, 8)
    theirs = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(ours, theirs)


def _hf_model(c, seed):
    """transformers' DeepseekV3ForCausalLM for `c`, random, positive gate biases (both group-mask
    conventions agree then: see test_model)."""
    hf_config = transformers.DeepseekV3Config(
        **{
            k: v
            for k, v in c.to_hf().items()
            if k not in ("architectures", "model_type", "quantization_config")
        }
    )
    torch.manual_seed(seed)
    hf = transformers.DeepseekV3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for layer in hf.model.layers[c.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.uniform_(0.0, 0.05)
    return hf


def test_transformers_directory_with_mtp_in_config_loads_without_mtp(tmp_path):
    # What DeepseekV3ForCausalLM.save_pretrained writes for V3: num_nextn_predict_layers 1 in
    # config.json, no model.layers.3.* weights (transformers has no MTP module).
    c = tiny()
    assert c.num_nextn_predict_layers == 1
    hf = _hf_model(c, seed=3)
    hf.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, ours = load_model(tmp_path)
    mtp_warnings = [w for w in caught if "holds no MTP weights" in str(w.message)]
    assert len(mtp_warnings) == 1, [str(w.message) for w in caught]
    assert "num_nextn_predict_layers=1" in str(mtp_warnings[0].message)
    assert config.num_nextn_predict_layers == 0 and len(ours.mtp) == 0
    assert ours.missing_mtp_layers == 1
    ids = torch.randint(0, 1024, (2, 19))
    with torch.no_grad():
        out = ours(ids)
        assert _rel(out.logits, hf(ids).logits) < 1e-5
    assert out.mtp_logits == []
    # The engine without speculation serves it; with speculation it names the missing weights.
    engine = Engine(ours, EngineConfig(num_pages=8, page_size=16, use_cuda_graphs=False))
    done = engine.generate([ids[0].tolist()], SamplingParams(temperature=0, max_tokens=3))
    assert len(done[0].output_token_ids) == 3
    with pytest.raises(ValueError, match=r"needs the MTP weights.*model\.layers\.3\."):
        Engine(ours, EngineConfig(num_pages=8, page_size=16, num_speculative_tokens=1))


def test_partial_mtp_weights_are_named(tmp_path):
    c = tiny()
    torch.manual_seed(2)
    save_model(Transformer(c), c, tmp_path)
    shard = next(tmp_path.glob("model-*.safetensors"))
    tensors = load_file(str(shard))
    del tensors["model.layers.3.eh_proj.weight"]
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match=r"1 missing tensors: model\.layers\.3\.eh_proj\.weight"):
        load_model(tmp_path)
