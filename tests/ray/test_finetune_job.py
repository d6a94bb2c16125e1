"""Fine-tuning through the Ray Train job: `init_from: DIR` (an HF directory of tiny() with nonzero
router biases and its own tokenizer) starts training from DIR's weights, biases and tokenizer, on
one device and on a PP=2 pipeline; the first step's loss is DIR's model on the first batch (a
from-scratch start has another), and the result is an HF directory that transformers loads with
the same logits and that `moeray serve` accepts."""

import json

import pytest


@pytest.fixture(scope="module")
def start_dir(tmp_path_factory):
    import torch

    from moeray.platform.checkpoint import save_model
    from moeray.platform.config import tiny
    from moeray.platform.model.transformer import Transformer
    from moeray.platform.train import data as tdata
    from moeray.platform.train import step as tstep

    model = Transformer(tiny())
    model.reset_parameters(seed=11)  # not the job's seed 0: step 0 shows which weights ran
    g = torch.Generator().manual_seed(3)
    tstep.set_biases(model, 0.05 * torch.randn(len(tstep.moe_layers(model)), 16, generator=g))
    path = tmp_path_factory.mktemp("start")
    texts = tdata.corpus_texts(None, 200_000)
    save_model(model, tiny(), path, tokenizer=None)
    tdata.save_tokenizer(tdata.train_tokenizer(texts, vocab_size=500), path)
    return path


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [{}, {"pp": 2, "schedule": "1f1b", "microbatches": 2}],
    ids=["one-device", "pp2"],
)
def test_finetune_from_an_hf_directory(ray_local, tmp_path, layout, start_dir, tiny_train_job):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeray.platform.checkpoint import load_model
    from moeray.platform.config import ServeConfig
    from moeray.platform.serve.app import check_model_dir
    from moeray.platform.train import data as tdata
    from moeray.platform.train import step as tstep
    from moeray.platform.train.job import run

    job = tiny_train_job("ft", init_from=str(start_dir), parallel=layout)
    assert job.model == str(start_dir)  # the model is the checkpoint's
    out = run(job)

    run_dir = tmp_path / "ft"
    tokens = torch.load(run_dir / "data" / "tokens.pt")
    assert int(tokens.max()) < 500  # encoded with the checkpoint's tokenizer (500 ids)
    recs = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    _, start = load_model(start_dir)
    batch = tdata.BatchLoader(tdata.PackedDataset(tokens, 32), 4, seed=0).next_batch()
    parts = tstep.compute_loss(start, batch, job.loss)
    assert recs[0]["loss"] == pytest.approx(parts.main, rel=1e-5)
    assert recs[0]["balance"] == pytest.approx(parts.balance, rel=1e-4)
    assert recs[-1]["loss"] < recs[0]["loss"]

    _, tuned = load_model(out)
    ids = torch.tensor([AutoTokenizer.from_pretrained(out).encode("def f(x):\n    return x")])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, tuned(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(start(ids).logits, tuned(ids).logits)  # it trained
    check_model_dir(ServeConfig(model=str(out)))
    if not layout:  # one device: the HF directory holds the last checkpoint's weights
        saved = torch.load(run_dir / "step_0000002" / "rank0.pt", weights_only=False)["model"]
        for k, v in tuned.state_dict().items():
            assert torch.equal(v.float(), saved[k].float()), k
