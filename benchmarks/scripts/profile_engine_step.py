"""Where a decode step's time goes: cProfile of Engine.step at batch B on `small()` (random
weights).

python benchmarks/scripts/profile_engine_step.py [--batch 1] [--steps 50]
"""

import argparse
import cProfile
import pstats
import time

import torch

from moeray.platform.config import small
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model.transformer import Transformer

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=1)
p.add_argument("--steps", type=int, default=50)
a = p.parse_args()
torch.manual_seed(0)
with torch.device("cuda"):
    model = Transformer(small()).to(torch.bfloat16).eval()
engine = Engine(model, EngineConfig(num_pages=2048, max_num_seqs=max(a.batch, 1)))
params = SamplingParams(temperature=0.0, max_tokens=a.steps + 40, ignore_eos=True)
for _i in range(a.batch):
    engine.add_request(torch.randint(2, 32000, (128,)).tolist(), params)
for _ in range(20):  # prefill + warm-up decode steps (graph capture happens here)
    engine.step()
torch.cuda.synchronize()
t = time.perf_counter()
prof = cProfile.Profile()
prof.enable()
for _ in range(a.steps):
    engine.step()
torch.cuda.synchronize()
prof.disable()
dt = (time.perf_counter() - t) / a.steps
print(f"batch {a.batch}: {dt * 1e3:.2f} ms/step, cuda_graphs={engine.runner.graph_status}")
pstats.Stats(prof).sort_stats("cumulative").print_stats(22)
