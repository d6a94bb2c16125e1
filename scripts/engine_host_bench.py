"""The engine's per-step host work at long outputs: a batch of requests each generating many
tokens with a tokenizer attached (as every served model has), on a 1-layer tiny model so that the
model's own time stays small, and how much of a step is host work outside the model call
(scheduling, sampling, the scheduler's update: stop checks, detokenization, outputs).

On a GPU that host work sits between graph replays: the engine reads the sampled ids back every
step, so the GPU waits while it runs. Writes benchmarks/results/engine-host-<device>[-<tag>].json.

    python scripts/engine_host_bench.py --batch 32 --tokens 1024
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.trainers import BpeTrainer

from moeray.platform.config import tiny
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model.transformer import Transformer
from moeray.results import device_slug, write_result


def byte_level_bpe(vocab: int) -> Tokenizer:
    """A small byte-level BPE (GPT-2 / DeepSeek style), trained here: multi-byte characters split
    over tokens as with real tokenizers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    text = "hello world, this is a test of the tokenizer: é, €, 😀. " * 50
    trainer = BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return tok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=1024, help="generated tokens per request")
    p.add_argument("--tag", default="")
    a = p.parse_args()
    torch.set_num_threads(1)
    tok = byte_level_bpe(300)
    cfg = tiny().replace(num_hidden_layers=1, vocab_size=tok.get_vocab_size(), eos_token_id=None)
    model = Transformer(cfg)
    model.reset_parameters(seed=1)
    pages = a.batch * (-(-(a.tokens + 32) // 16) + 1)
    eng = Engine(
        model,
        EngineConfig(page_size=16, num_pages=pages, max_model_len=a.tokens + 64),
        tokenizer=tok,
    )
    params = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True)
    for r in range(a.batch):
        eng.add_request(list(range(1, 17)), params, f"r{r}")
    spent: dict[str, float] = collections.defaultdict(float)

    def timed(obj, name):
        fn = getattr(obj, name)

        def run(*args, **kw):
            t = time.perf_counter()
            out = fn(*args, **kw)
            spent[name] += time.perf_counter() - t
            return out

        setattr(obj, name, run)

    timed(eng.scheduler, "update")
    timed(eng.runner, "execute")
    steps, t0 = 0, time.perf_counter()
    while eng.has_unfinished():
        eng.step()
        steps += 1
    total = time.perf_counter() - t0
    ms = {k: round(v / steps * 1e3, 3) for k, v in spent.items()}
    numbers = {
        "batch": a.batch,
        "generated_tokens": a.tokens,
        "steps": steps,
        "step_ms": round(total / steps * 1e3, 3),
        "scheduler_update_ms": ms["update"],
        "model_execute_ms": ms["execute"],
        "host_outside_execute_ms": round((total - spent["execute"]) / steps * 1e3, 3),
    }
    print(numbers)
    name = f"engine-host-{device_slug()}" + (f"-{a.tag}" if a.tag else "")
    write_result(name, numbers, command="python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
