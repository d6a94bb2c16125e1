"""Our model against transformers' DeepseekV3ForCausalLM, the independent oracle, in fp32.

Both directions: we save and transformers loads; transformers builds and saves and we load. A
tiny random config with YaRN, q/kv LoRA, a dense first layer, groups and a shared expert."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moeray.platform.checkpoint import load_model, save_model  # noqa: E402
from moeray.platform.config import ModelConfig, tiny  # noqa: E402
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


def test_mtp_config_without_mtp_weights_names_them(tmp_path):
    c = tiny().replace(num_nextn_predict_layers=0)
    torch.manual_seed(2)
    save_model(Transformer(c), c, tmp_path)
    cfg = (
        (tmp_path / "config.json")
        .read_text()
        .replace('"num_nextn_predict_layers": 0', '"num_nextn_predict_layers": 1')
    )
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match=r"missing tensors: .*model\.layers\.3\.eh_proj\.weight"):
        load_model(tmp_path)
    assert ModelConfig.from_hf(tmp_path).num_nextn_predict_layers == 1
