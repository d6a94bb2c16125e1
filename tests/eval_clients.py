"""lm-evaluation-harness and aiperf as users run them against a served model, for the tests that
check the OpenAI server with them (tests/unit/test_eval_clients.py: the colocated app;
tests/ray/test_serve_app.py: the prefill/decode Serve application).

lm-eval runs three local tasks (`write_tasks`: JSON lines, no dataset hub) through the server and
through lm-eval's own `hf` backend on the served directory, where transformers computes the
oracle (`evaluate`, `assert_same`): multiple choice by log-likelihood, one option of each question
being the model's greedy continuation so that `is_greedy` is true for it; a rolling
log-likelihood over whole documents; greedy generation with a stop string. aiperf profiles the
server with synthetic prompts (`run_aiperf`, `check_aiperf`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Contexts of the tasks: code, what the tests' tokenizers are trained on.
CONTEXTS = [
    "def load(path):\n    with open(path) as f:",
    "import os\nimport sys\n\n\ndef main():",
    "class Config:\n    def __init__(self, name):",
    "values = [1, 2, 3]\nprint(",
]
TASKS = ["moeray_mc", "moeray_rolling", "moeray_gen"]


def greedy_choices(model_dir: Path) -> list[str | None]:
    """Per context, transformers' greedy continuation as text: its first 3, 2 or 1 tokens, the
    longest whose text tokenizes back to the same ids after the context (lm-eval scores a choice
    by tokenizing context + choice; random weights also emit partial UTF-8 bytes); None where
    none does."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    choices: list[str | None] = []
    for context in CONTEXTS:
        ids = tok(context)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            out = hf.eval().generate(
                x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=3
            )
        greedy = out[0, len(ids) :].tolist()
        texts = [tok.decode(greedy[:n]) for n in (3, 2, 1)]
        ok = [
            t
            for n, t in zip((3, 2, 1), texts, strict=True)
            if tok(context + t)["input_ids"] == ids + greedy[:n]
        ]
        choices.append(ok[0] if ok else None)
    return choices


def write_tasks(task_dir: Path, model_dir: Path) -> list[bool]:
    """The three tasks' YAML and data in `task_dir`; per question, whether one of its choices is
    the model's greedy continuation."""
    greedy = greedy_choices(model_dir)
    mc = [
        {"context": c, "choices": [" return None", g or " x", "\n    pass"], "answer": i % 3}
        for i, (c, g) in enumerate(zip(CONTEXTS, greedy, strict=True))
    ]
    docs = [{"context": c, "target": "\n"} for c in CONTEXTS]
    (task_dir / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (task_dir / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs))
    bodies = {
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
    for name, (data, body) in bodies.items():
        (task_dir / f"{name}.yaml").write_text(
            f"task: {name}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {task_dir / data}\n"
            "test_split: test\n" + body
        )
    return [g is not None for g in greedy]


def api_args(base_url: str, model_id: str, model_dir: Path | None = None) -> dict:
    """lm-eval's `local-completions` arguments (with the tokenizer, `model_dir`) or, without it,
    `local-chat-completions`': two concurrent workers, one retry."""
    if model_dir is None:
        url = f"{base_url}/v1/chat/completions"
        return {"model": model_id, "base_url": url, "num_concurrent": 2, "max_retries": 1}
    return {
        "model": model_id,
        "base_url": f"{base_url}/v1/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": str(model_dir),
        "num_concurrent": 2,
        "max_retries": 1,
    }


def hf_args(model_dir: Path) -> dict:
    """lm-eval's transformers backend on the served directory: the oracle (device="cpu")."""
    return {"pretrained": str(model_dir), "dtype": "float32"}


def evaluate(model: str, model_args: dict, tasks: list[str], task_dir: Path, **kw) -> dict:
    """{task: [each sample's responses]} of one lm-eval run, in document order."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        # Only the local tasks: indexing lm-eval's ~15,000 built-in ones takes ~10 s a call here.
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
        **kw,
    )
    assert out is not None
    return {
        t: [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
        for t, samples in out["samples"].items()
    }


def assert_same(api: dict, oracle: dict) -> None:
    """The server's responses equal the oracle's: log-likelihoods within 1e-4, is_greedy and
    texts exactly."""
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


def greedy_flags(oracle: dict) -> list[bool]:
    """Per question of the multiple-choice task, whether the oracle found a greedy choice."""
    return [any(bool(r[0][1]) for r in doc) for doc in oracle["moeray_mc"]]


def run_aiperf(
    base_url: str, model_id: str, model_dir: Path, out: Path, endpoint: str, n: int, osl: int
) -> dict:
    """`aiperf profile` of n streaming requests (40 synthetic prompt tokens, osl output tokens
    with ignore_eos, 3 at a time) on `endpoint` (chat or completions): its JSON report."""
    exe = shutil.which("aiperf", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("aiperf is not installed (the `test` extra installs it)")
    # fmt: off
    cmd = [
        exe, "profile", "--model", model_id, "--url", base_url, "--endpoint-type", endpoint,
        "--streaming", "--tokenizer", str(model_dir),
        "--prompt-input-tokens-mean", "40", "--prompt-input-tokens-stddev", "0",
        "--prompt-output-tokens-mean", str(osl), "--prompt-output-tokens-stddev", "0",
        "--extra-inputs", "ignore_eos:true", "--request-count", str(n), "--concurrency", "3",
        "--random-seed", "0", "--workers-max", "1", "--ui-type", "none",
        "--no-gpu-telemetry", "--no-server-metrics", "--output-artifact-dir", str(out),
    ]
    # fmt: on
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return json.loads((out / "profile_export_aiperf.json").read_text())


def check_aiperf(report: dict, n: int, osl: int) -> None:
    """Every request completed without error with exactly osl tokens by the server's usage, and
    the streaming latencies were measured."""
    assert report["request_count"]["avg"] == n
    assert report["completed_request_count"]["avg"] == n
    assert report["request_error_rate"]["avg"] == 0
    assert not report["error_summary"]
    assert report["usage_completion_tokens"]["min"] == osl
    assert report["usage_completion_tokens"]["max"] == osl
    assert report["total_usage_completion_tokens"]["avg"] == n * osl
    assert report["time_to_first_token"]["avg"] > 0
    assert report["inter_token_latency"]["avg"] > 0
