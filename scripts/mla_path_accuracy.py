"""How far MLA's expanded and absorbed paths land from fp32 when the model runs in bf16, on CPU:
a published config's widths with random weights and fewer layers, 128-token prompts, the last
layer's logits of every position against the fp32 model's (relative Frobenius error, and the
share of positions whose argmax agrees). The engine prefills through either path (expanded by
default, absorbed in the prefill-chunk graphs), so neither should be the less accurate one.

    python scripts/mla_path_accuracy.py [--preset moonlight_16b_a3b] [--layers 3] [--trials 3]

Writes benchmarks/results/mla-path-accuracy-<preset>-cpu.json (~2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeray.platform.config import preset
from moeray.platform.model.transformer import Transformer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="moonlight_16b_a3b")
    p.add_argument("--layers", type=int, default=3, help="1 dense + the rest MoE")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=128)
    a = p.parse_args()
    cfg = preset(a.preset).replace(
        num_hidden_layers=a.layers, first_k_dense_replace=1, num_nextn_predict_layers=0
    )
    m32 = Transformer(cfg).eval()
    m32.reset_parameters(seed=1)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    rows = []
    with torch.no_grad():
        for trial in range(a.trials):
            ids = torch.randint(0, cfg.vocab_size, (1, a.prompt_len), generator=g)
            ref = m32(ids, return_mtp=False, absorbed=False).logits.float()
            for path, absorbed in (("expanded", False), ("absorbed", True)):
                out = m16(ids, return_mtp=False, absorbed=absorbed).logits.float()
                rel = float((out - ref).norm() / ref.norm())
                agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
                rows.append({"trial": trial, "path": path, "rel_err": rel, "argmax_agree": agree})
                print(f"trial {trial} {path:8s} rel {rel:.4e} argmax agrees {agree:.3f}")
    out_path = Path("benchmarks/results") / f"mla-path-accuracy-{a.preset}-cpu.json"
    out_path.write_text(
        json.dumps(
            {
                "device": "cpu",
                "date": datetime.date.today().isoformat(),
                "command": "python " + " ".join(sys.argv),
                "layers": a.layers,
                "prompt_len": a.prompt_len,
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print("wrote", out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
