"""Clients that no one here wrote, used unchanged against the OpenAI server: lm-evaluation-harness
(its `local-completions` and `local-chat-completions` API backends) and NVIDIA's aiperf
(tests/eval_clients.py runs them; the prefill/decode Serve application meets lm-eval in
tests/ray/test_serve_app.py).

The model directory is the kind the training job writes (tiny() without MTP, random weights, the
byte-level BPE tokenizer and chat template of train/data.py), served the way `moeray serve
--mode colocated` serves it (test_openai_schemas.serve_model_dir).

lm-eval: the three tasks through the server and through lm-eval's transformers backend agree
(every log-likelihood within 1e-4, `is_greedy` and the generated texts equal); the API backend
sends several prompts a request (token ids, echo and logprobs) from two concurrent workers, and
the chat backend renders the directory's chat template. aiperf: streaming chat and completions
with ignore_eos, every request complete with the requested number of tokens.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from test_openai_schemas import serve_model_dir

from moeray.platform.checkpoint import save_model
from moeray.platform.config import tiny
from moeray.platform.model.transformer import Transformer
from moeray.platform.train.data import save_tokenizer, train_tokenizer
from tests import eval_clients as clients

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

MODEL_ID = "tiny-eval"
VOCAB = 512


def code_corpus(docs: int = 200) -> list[str]:
    """Python-like documents from a fixed seed: the tokenizer, hence the model's greedy answers
    that write_tasks needs, stay the same however the repository's own source changes."""
    rng = random.Random(0)
    words = (
        "path name value config items result data line key index count total parser reader "
        "writer buffer offset length status message error handler request response client "
        "server session token model layer weight cache batch shape device stream record"
    ).split()
    forms = [
        "def {a}({b}):\n    return {b}.{c}\n",
        "import {a}\nimport {b}\n",
        "class {A}:\n    def __init__(self, {a}):\n        self.{a} = {a}\n",
        "with open({a}) as f:\n    {b} = f.read()\n",
        "{a} = [1, 2, 3]\nprint({a}, {b})\n",
        "for {a} in {b}:\n    if {a} is None:\n        pass\n",
    ]
    texts = []
    for _ in range(docs):
        lines = []
        for form in rng.choices(forms, k=8):
            a, b, c = rng.sample(words, 3)
            lines.append(form.format(a=a, b=b, c=c, A=a.title()))
        texts.append("\n".join(lines))
    return texts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tok = train_tokenizer(code_corpus(), VOCAB)
    tok_dir = save_tokenizer(tok, tmp_path_factory.mktemp("tokenizer")).parent
    cfg = tiny().replace(vocab_size=VOCAB, num_nextn_predict_layers=0)
    model = Transformer(cfg).eval()
    # Seed 7: every context's greedy continuation round-trips through the tokenizer (write_tasks).
    model.reset_parameters(seed=7)
    return save_model(model, cfg, tmp_path_factory.mktemp("model"), tokenizer=tok_dir)


@pytest.fixture(scope="module")
def base_url(model_dir):
    sizes = dict(
        page_size=16, num_pages=128, max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512
    )
    with serve_model_dir(model_dir, MODEL_ID, **sizes) as url:
        yield url


@pytest.fixture(scope="module")
def task_dir(model_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tasks")
    assert all(clients.write_tasks(d, model_dir)), "a greedy choice for every question"
    return d


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_lm_eval_completions_match_transformers(offline, base_url, model_dir, task_dir):
    api = clients.evaluate(
        "local-completions",
        clients.api_args(base_url, MODEL_ID, model_dir),
        clients.TASKS,
        task_dir,
        batch_size=3,
    )
    oracle = clients.evaluate(
        "hf", clients.hf_args(model_dir), clients.TASKS, task_dir, device="cpu"
    )
    assert all(clients.greedy_flags(oracle)), "the oracle scores each greedy choice as greedy"
    clients.assert_same(api, oracle)


def test_lm_eval_chat_completions_match_transformers(offline, base_url, model_dir, task_dir):
    tasks = ["moeray_gen"]
    api = clients.evaluate(
        "local-chat-completions",
        clients.api_args(base_url, MODEL_ID),
        tasks,
        task_dir,
        apply_chat_template=True,
    )
    oracle = clients.evaluate(
        "hf", clients.hf_args(model_dir), tasks, task_dir, device="cpu", apply_chat_template=True
    )
    assert any(r[0][0] for r in oracle["moeray_gen"]), "the oracle generated some text"
    clients.assert_same(api, oracle)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_aiperf_profiles_the_server(base_url, model_dir, tmp_path, endpoint):
    n, osl = 6, 10
    report = clients.run_aiperf(base_url, MODEL_ID, model_dir, tmp_path / "ap", endpoint, n, osl)
    clients.check_aiperf(report, n, osl)
