"""One pipeline stage's forward + backward (tiny(), CPU, one thread): routed experts through the
per-expert loop vs `Experts.mlp_fn` (one autograd node, grouped GEMMs). Host-bound like the GPU
training run, so it shows what the change saves per op. Writes
benchmarks/results/experts-mlp-cpu.json.

    .venv/bin/python scripts/experts_mlp_bench.py
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeray.platform.config import tiny
from moeray.platform.model.transformer import Transformer
from moeray.platform.parallel.stages import PipelineStage, enable_weight_grad_split, split_layers
from moeray.platform.train import step as ts
from moeray.results import write_result


def stage_ms(grouped: bool, reps: int = 10) -> float:
    full = Transformer(tiny())
    full.reset_parameters(seed=0)
    stage = PipelineStage(full, split_layers(3, 1, 1), 0)
    enable_weight_grad_split(stage, stage.store)
    if not grouped:
        for m in stage.modules():
            if hasattr(m, "mlp_fn"):
                m.mlp_fn = None  # back to the per-expert loop
    tokens = torch.randint(
        0, tiny().vocab_size, (4, 65), generator=torch.Generator().manual_seed(0)
    )
    times = []
    for _ in range(reps + 2):
        t = time.perf_counter()
        loss, _, _ = stage.forward_chunk(None, tokens, ts.LossConfig(), 0.5)
        loss.backward()
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:]) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    loop, grouped = [], []
    for _ in range(3):  # interleaved, so drift hits both
        loop.append(stage_ms(False))
        grouped.append(stage_ms(True))
    numbers = {
        "model": "tiny",
        "batch": "4 x 64 tokens",
        "threads": 1,
        "per_expert_loop_ms": round(min(loop), 2),
        "experts_mlp_ms": round(min(grouped), 2),
        "speedup": round(min(loop) / min(grouped), 2),
        "all_loop_ms": [round(v, 2) for v in loop],
        "all_experts_mlp_ms": [round(v, 2) for v in grouped],
    }
    path = write_result("experts-mlp-cpu", numbers, command="python scripts/experts_mlp_bench.py")
    print(numbers, "->", path)


if __name__ == "__main__":
    main()
