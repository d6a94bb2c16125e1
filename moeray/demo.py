"""`moeray demo`: the main job end to end on an embedded default.

Stages, each printed as it runs:
  1. build the tiny DeepSeek-V3 model (MLA, DeepSeekMoE, MTP) and save it as an HF directory;
  2. reload it from disk (the same loader that reads the official release);
  3. generate a few tokens greedily for a few prompts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="moeray demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="artifacts/demo-model", help="where the model directory goes")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from moeray.platform.checkpoint import load_model, save_model
    from moeray.platform.config import tiny
    from moeray.platform.model.transformer import Transformer, greedy_generate

    torch.manual_seed(args.seed)
    config = tiny()
    t0 = time.perf_counter()
    model = Transformer(config).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"[1/3] built tiny DeepSeek-V3: {n:,} parameters, {config.num_hidden_layers} layers, "
          f"{config.n_routed_experts} routed experts (top-{config.num_experts_per_tok} over "
          f"{config.topk_group}/{config.n_group} groups), MTP depth {config.num_nextn_predict_layers}")
    out = Path(args.out)
    save_model(model, config, out)
    print(f"      saved HF directory {out} ({', '.join(sorted(f.name for f in out.iterdir()))})")
    config2, model2 = load_model(out)
    print(f"[2/3] reloaded from {out}: config equal={config2 == config}")
    prompts = torch.randint(2, config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(args.seed))
    ids = greedy_generate(model2, prompts, args.max_new_tokens)
    print(f"[3/3] greedy generation, {args.max_new_tokens} new tokens per prompt:")
    for row, prompt in zip(ids.tolist(), prompts.tolist()):
        print(f"      prompt {prompt} -> {row[len(prompt):]}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0
