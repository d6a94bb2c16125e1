"""`moeray serve` checks the model directory in the driver before anything is deployed: a broken
one exits non-zero with its cause (it used to fail as Serve's "Failed to update the deployments
['Prefill', 'Decode']", the cause in a replica's log). Through the CLI entry; no Ray is started."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from moeray import cli
from moeray.platform.checkpoint import check_checkpoint, load_model, save_model
from moeray.platform.config import ServeConfig, tiny
from moeray.platform.model.transformer import Transformer
from moeray.platform.serve.app import check_model_dir

pytestmark = pytest.mark.usefixtures("refuse_ray_init")


def _model_dir(path, config=None):
    from tokenizers import Tokenizer, models

    c = config or tiny()
    model = Transformer(c)
    model.reset_parameters(seed=0)
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    return save_model(model, c, path, tokenizer=tok, max_shard_bytes=300_000)


def _serve(capsys, path, *extra):
    rc = cli.main(["serve", "--model", str(path), *extra])
    return rc, capsys.readouterr().err


def _shard_with(path, key):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path / index["weight_map"][key]


def test_a_good_directory_passes_and_the_check_reads_no_tensor_data(tmp_path, monkeypatch):
    path = _model_dir(tmp_path / "m")
    assert check_model_dir(ServeConfig(model=str(path), num_speculative_tokens=1)) == []

    def no_data(*args, **kwargs):
        raise AssertionError("the check read tensor data")

    monkeypatch.setattr("safetensors.safe_open", no_data)
    monkeypatch.setattr("safetensors.torch.load_file", no_data)
    config, missing_mtp = check_checkpoint(path)
    assert config == tiny() and missing_mtp == 0
    with pytest.raises(AssertionError, match="read tensor data"):
        load_model(path)  # the real load does go through safe_open


def test_missing_tensor(tmp_path, capsys):
    path = _model_dir(tmp_path / "m")
    key = "model.layers.2.mlp.experts.5.down_proj.weight"
    shard = _shard_with(path, key)
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    rc, err = _serve(capsys, path)
    assert rc == 2
    assert f"cannot serve {path}" in err and f"1 missing tensors: {key}" in err


def test_mis_shaped_tensor_and_truncated_file(tmp_path, capsys):
    path = _model_dir(tmp_path / "m")
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    shard = _shard_with(path, key)
    tensors = load_file(str(shard))
    tensors[key] = torch.zeros(128, 31)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    rc, err = _serve(capsys, path)
    assert rc == 2 and f"{key}: checkpoint (128, 31) vs model (128, 32)" in err
    shard.write_bytes(shard.read_bytes()[:-100])
    rc, err = _serve(capsys, path)
    assert rc == 2 and "is truncated" in err and shard.name in err


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"n_group": 3}, "n_group=3 is invalid: expected a divisor of n_routed_experts=16"),
        ({"scoring_func": "softmax"}, "scoring_func='softmax' is invalid"),
        (
            {"q_lora_rank": "big"},
            "q_lora_rank='big' is invalid: expected a positive integer or null",
        ),
        (None, "is not valid JSON"),
    ],
)
def test_bad_config(tmp_path, capsys, change, expected):
    path = _model_dir(tmp_path / "m")
    config_file = path / "config.json"
    if change is None:
        config_file.write_text(config_file.read_text()[:-20])
    else:
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    rc, err = _serve(capsys, path)
    assert rc == 2 and expected in err, err


def test_missing_or_broken_tokenizer(tmp_path, capsys):
    path = _model_dir(tmp_path / "m")
    (path / "tokenizer.json").unlink()
    rc, err = _serve(capsys, path)
    assert rc == 2 and "tokenizer does not load" in err and "no tokenizer.json" in err
    (path / "tokenizer.json").write_text("{not json")
    rc, err = _serve(capsys, path)
    assert rc == 2 and "tokenizer does not load" in err


def test_chat_template_from_a_file_or_as_written(tmp_path, capsys):
    """--chat-template FILE|TEMPLATE: the template's text goes into the written config (the
    replicas need no file); one that does not parse, or a path that is no file, exits 2."""
    path = _model_dir(tmp_path / "m")
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    for given in (str(tmp_path / "t.jinja"), template):
        out = tmp_path / "serve.yaml"
        rc, err = _serve(capsys, path, "--chat-template", given, "--write-config", str(out))
        (app,) = yaml.safe_load(out.read_text())["applications"]
        assert rc == 0 and app["args"]["chat_template"] == template, err
    assert check_model_dir(ServeConfig(model=str(path), chat_template=template)) == []
    with pytest.raises(ValueError, match="chat_template does not parse"):
        check_model_dir(ServeConfig(model=str(path), chat_template="{% if %}"))
    with pytest.raises(SystemExit):
        _serve(capsys, path, "--chat-template", str(tmp_path / "nowhere.jinja"))
    assert "is neither a file nor a Jinja template" in capsys.readouterr().err


def test_missing_weights_and_missing_directory(tmp_path, capsys):
    path = _model_dir(tmp_path / "m")
    for f in path.glob("model-*.safetensors"):
        f.unlink()
    rc, err = _serve(capsys, path)
    assert rc == 2 and "names weight files that are not in" in err
    rc, err = _serve(capsys, tmp_path / "nowhere")
    assert rc == 2 and "config.json missing" in err


def test_speculation_without_mtp_weights(tmp_path, capsys):
    # A directory as transformers writes it: num_nextn_predict_layers 1, no MTP weights.
    c = tiny().replace(num_nextn_predict_layers=0)
    path = _model_dir(tmp_path / "m", c)
    hf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf, "num_nextn_predict_layers": 1}))
    rc, err = _serve(capsys, path, "--num-speculative-tokens", "1")
    assert rc == 2 and "needs the MTP weights" in err and "model.layers.3." in err
    # Without speculation it is servable: a note, no error.
    notes = check_model_dir(ServeConfig(model=str(path)))
    assert len(notes) == 1 and "holds no MTP weights" in notes[0]


def test_weights_fp8_serves_an_fp8_checkpoint_as_fp8(tmp_path, capsys):
    from moeray.kernels.common import FP8_DTYPE
    from moeray.platform.engine.sampler import SamplingParams
    from moeray.platform.model.quant import FP8Linear
    from moeray.platform.serve.worker import make_engine

    plain = _model_dir(tmp_path / "plain")
    rc, err = _serve(capsys, plain, "--weights", "fp8")
    assert rc == 2 and "has no quantization_config" in err
    with pytest.raises(ValueError, match="weights='int4': accepted 'dequantize' or 'fp8'"):
        ServeConfig(weights="int4")
    model = Transformer(tiny())
    model.reset_parameters(seed=1)
    path = save_model(model, tiny(), tmp_path / "fp8", fp8=True)
    _model_dir(tmp_path / "tok")  # borrow its tokenizer files
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).write_bytes((tmp_path / "tok" / f).read_bytes())
    engines = {}
    for weights in ("dequantize", "fp8"):
        cfg = ServeConfig(model=str(path), weights=weights, device="cpu", num_pages=8)
        assert check_model_dir(cfg) == []
        engines[weights] = make_engine(cfg)
    kept, deq = engines["fp8"].model, engines["dequantize"].model
    assert isinstance(kept.model.layers[0].self_attn.kv_b_proj, FP8Linear)
    assert kept.model.layers[1].mlp.experts.down_proj.dtype == FP8_DTYPE
    assert not isinstance(deq.model.layers[0].self_attn.kv_b_proj, FP8Linear)
    # On a CPU the kept weights are dequantized per use: the same numbers, the same tokens.
    params = SamplingParams(temperature=0, max_tokens=5)
    outs = {
        w: [o.output_token_ids for o in e.generate([[3, 1, 4, 1, 5]], params)]
        for w, e in engines.items()
    }
    assert outs["fp8"] == outs["dequantize"]


def test_ep_must_divide_the_experts_and_dummy_needs_no_weights(tmp_path, capsys):
    path = _model_dir(tmp_path / "m")
    rc, err = _serve(capsys, path, "--mode", "colocated", "--ep", "3")
    assert rc == 2 and "--ep 3 does not divide the model's 16 routed experts" in err
    for f in path.glob("*.safetensors"):
        f.unlink()
    # dummy weights: config.json (and the tokenizer) are all a directory needs
    cfg = ServeConfig(model=str(path), mode="colocated", ep=2, load_format="dummy")
    assert check_model_dir(cfg) == []
    with pytest.raises(ValueError, match="names weight files that are not in"):
        check_model_dir(cfg.replace(load_format="safetensors"))
