"""Clients that no one here wrote, used unchanged against the OpenAI server: lm-evaluation-harness
(its `local-completions` and `local-chat-completions` API backends) and NVIDIA's aiperf.

The model directory is the kind the training job writes (tiny() without MTP, random weights, the
byte-level BPE tokenizer and chat template of train/data.py), served the way `moeray serve`
serves it (check_model_dir, make_engine, a ColocatedWorker behind the OpenAI app, uvicorn in a
thread).

lm-eval: the same tasks run through the server and through lm-eval's own `hf` backend on the
same directory, where transformers computes the oracle: multiple choice by log-likelihood (one
option of each question is the model's greedy continuation, so `is_greedy` is true for it), a
rolling log-likelihood over whole documents, and greedy generation with a stop string, plain and
through the chat template. Every log-likelihood agrees within 1e-4, `is_greedy` and the generated
texts are equal. The API backend sends several prompts a request (token ids, echo and logprobs)
from two concurrent workers.

aiperf: `aiperf profile` over streaming chat and streaming completions with ignore_eos: every
request completes without error, each returns the requested number of tokens by the server's
usage, and the time to first token is measured.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_openai_schemas import serve_model_dir

from moeray.platform.checkpoint import save_model
from moeray.platform.config import tiny
from moeray.platform.model.transformer import Transformer
from moeray.platform.train.data import save_tokenizer, train_tokenizer

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

MODEL_ID = "tiny-eval"
VOCAB = 512
# Contexts of the multiple-choice and generation tasks: code, the tokenizer's training text.
CONTEXTS = [
    "def load(path):\n    with open(path) as f:",
    "import os\nimport sys\n\n\ndef main():",
    "class Config:\n    def __init__(self, name):",
    "values = [1, 2, 3]\nprint(",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = Path(__file__).parents[2] / "moeray/platform"
    tok = train_tokenizer([p.read_text() for p in sorted(root.glob("*.py"))], VOCAB)
    tok_dir = save_tokenizer(tok, tmp_path_factory.mktemp("tokenizer")).parent
    cfg = tiny().replace(vocab_size=VOCAB, num_nextn_predict_layers=0)
    model = Transformer(cfg).eval()
    model.reset_parameters(seed=5)
    return save_model(model, cfg, tmp_path_factory.mktemp("model"), tokenizer=tok_dir)


@pytest.fixture(scope="module")
def base_url(model_dir):
    sizes = dict(
        page_size=16, num_pages=128, max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512
    )
    with serve_model_dir(model_dir, MODEL_ID, **sizes) as url:
        yield url


def _greedy_choices(model_dir: Path) -> list[str]:
    """Per context, transformers' greedy continuation as text: its first 3, 2 or 1 tokens, the
    longest whose text tokenizes back to the same ids after the context (lm-eval scores a choice
    by tokenizing context + choice; random weights also emit partial UTF-8 bytes)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    choices = []
    for context in CONTEXTS:
        ids = tok(context)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            out = hf.eval().generate(
                x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=3
            )
        greedy = out[0, len(ids) :].tolist()
        for n in (3, 2, 1):
            text = tok.decode(greedy[:n])
            if tok(context + text)["input_ids"] == ids + greedy[:n]:
                choices.append(text)
                break
        else:
            raise AssertionError(f"no greedy continuation of {context!r} tokenizes back")
    return choices


@pytest.fixture(scope="module")
def task_dir(model_dir, tmp_path_factory) -> Path:
    """Three lm-eval tasks over local JSON lines (no dataset hub)."""
    d = tmp_path_factory.mktemp("tasks")
    mc = [
        {"context": c, "choices": [" return None", greedy, "\n    pass"], "answer": i % 3}
        for i, (c, greedy) in enumerate(zip(CONTEXTS, _greedy_choices(model_dir), strict=True))
    ]
    docs = [{"context": c, "target": "\n"} for c in CONTEXTS]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (d / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs))
    tasks = {
        "moeray_mc": (
            "mc.jsonl",
            "output_type: multiple_choice\n"
            'doc_to_text: "{{context}}"\n'
            'doc_to_choice: "{{choices}}"\n'
            'target_delimiter: ""\n'  # the choices carry their own leading text
            "doc_to_target: answer\n"
            "metric_list:\n  - metric: acc\n",
        ),
        "moeray_rolling": (
            "docs.jsonl",
            "output_type: loglikelihood_rolling\n"
            'doc_to_text: ""\n'
            'doc_to_target: "{{context}}"\n'
            "metric_list:\n  - metric: word_perplexity\n",
        ),
        "moeray_gen": (
            "docs.jsonl",
            "output_type: generate_until\n"
            'doc_to_text: "{{context}}"\n'
            'doc_to_target: "{{target}}"\n'
            "generation_kwargs:\n"
            '  until: ["\\n\\n"]\n'
            "  max_gen_toks: 12\n"
            "  do_sample: false\n"
            "metric_list:\n  - metric: exact_match\n",
        ),
    }
    for name, (data, body) in tasks.items():
        (d / f"{name}.yaml").write_text(
            f"task: {name}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {d / data}\n"
            "test_split: test\n" + body
        )
    return d


def _evaluate(model: str, model_args: dict, tasks: list[str], task_dir: Path, **kw) -> dict:
    """{task: [each sample's response]} of one lm-eval run, in document order."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
        **kw,
    )
    assert out is not None
    return {
        t: [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
        for t, samples in out["samples"].items()
    }


def _assert_same(api: dict, oracle: dict) -> None:
    assert api.keys() == oracle.keys()
    for task in api:
        assert len(api[task]) == len(oracle[task]) == len(CONTEXTS), task
        for doc, (a, o) in enumerate(zip(api[task], oracle[task], strict=True)):
            assert len(a) == len(o), (task, doc)
            for ra, ro in zip(a, o, strict=True):
                (ra,), (ro,) = ra, ro  # one response a request, as lm-eval logs it
                if isinstance(ro, str):  # generate_until: the text
                    assert ra == ro, (task, doc)
                elif isinstance(ro, float):  # loglikelihood_rolling: the document's sum
                    assert ra == pytest.approx(ro, abs=1e-4), (task, doc)
                else:  # loglikelihood: (sum of log-probabilities, is_greedy)
                    assert float(ra[0]) == pytest.approx(float(ro[0]), abs=1e-4), (task, doc)
                    assert bool(ra[1]) == bool(ro[1]), (task, doc)


def _hf_args(model_dir: Path) -> dict:
    """lm-eval's transformers backend on the served directory: the oracle."""
    return {"pretrained": str(model_dir), "dtype": "float32"}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_lm_eval_completions_match_transformers(offline, base_url, model_dir, task_dir):
    tasks = ["moeray_mc", "moeray_rolling", "moeray_gen"]
    api = _evaluate(
        "local-completions",
        {
            "model": MODEL_ID,
            "base_url": f"{base_url}/v1/completions",
            "tokenizer_backend": "huggingface",
            "tokenizer": str(model_dir),
            "num_concurrent": 2,
            "max_retries": 1,
        },
        tasks,
        task_dir,
        batch_size=3,
    )
    oracle = _evaluate("hf", _hf_args(model_dir), tasks, task_dir, device="cpu")
    greedy = [any(bool(r[0][1]) for r in doc) for doc in oracle["moeray_mc"]]
    assert all(greedy), "each question has the model's greedy continuation among its choices"
    _assert_same(api, oracle)


def test_lm_eval_chat_completions_match_transformers(offline, base_url, model_dir, task_dir):
    api = _evaluate(
        "local-chat-completions",
        {
            "model": MODEL_ID,
            "base_url": f"{base_url}/v1/chat/completions",
            "num_concurrent": 2,
            "max_retries": 1,
        },
        ["moeray_gen"],
        task_dir,
        apply_chat_template=True,
    )
    oracle = _evaluate(
        "hf", _hf_args(model_dir), ["moeray_gen"], task_dir, device="cpu", apply_chat_template=True
    )
    assert any(r[0][0] for r in oracle["moeray_gen"]), "the oracle generated some text"
    _assert_same(api, oracle)


def _aiperf(base_url: str, model_dir: Path, out: Path, endpoint: str, n: int, osl: int) -> dict:
    exe = shutil.which("aiperf", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("aiperf is not installed (the `test` extra installs it)")
    cmd = [
        exe,
        "profile",
        "--model",
        MODEL_ID,
        "--url",
        base_url,
        "--endpoint-type",
        endpoint,
        "--streaming",
        "--tokenizer",
        str(model_dir),
        "--prompt-input-tokens-mean",
        "40",
        "--prompt-input-tokens-stddev",
        "0",
        "--prompt-output-tokens-mean",
        str(osl),
        "--prompt-output-tokens-stddev",
        "0",
        "--extra-inputs",
        "ignore_eos:true",
        "--request-count",
        str(n),
        "--concurrency",
        "3",
        "--random-seed",
        "0",
        "--workers-max",
        "1",
        "--ui-type",
        "none",
        "--no-gpu-telemetry",
        "--no-server-metrics",
        "--output-artifact-dir",
        str(out),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return json.loads((out / "profile_export_aiperf.json").read_text())


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_aiperf_profiles_the_server(base_url, model_dir, tmp_path, endpoint):
    n, osl = 6, 10
    report = _aiperf(base_url, model_dir, tmp_path / "aiperf", endpoint, n, osl)
    assert report["request_count"]["avg"] == n
    assert report["completed_request_count"]["avg"] == n
    assert report["request_error_rate"]["avg"] == 0
    assert not report["error_summary"]
    # ignore_eos: exactly the requested tokens, by the server's own count
    assert report["usage_completion_tokens"]["min"] == osl
    assert report["usage_completion_tokens"]["max"] == osl
    assert report["total_usage_completion_tokens"]["avg"] == n * osl
    assert report["time_to_first_token"]["avg"] > 0
    assert report["inter_token_latency"]["avg"] > 0
