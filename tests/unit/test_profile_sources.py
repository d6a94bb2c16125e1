"""`launching_source` names the moeray line that launched a profiled op, on the CPU profile of a
real forward (this torch leaves `evt.stack` empty: the line comes from the Python-function
ancestors) and on made-up events for the recorded-stack, skipped-frame and backward cases."""

from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from moeray.platform.config import tiny
from moeray.platform.model.transformer import Transformer
from moeray.profile_sources import launching_source


@dataclass
class Evt:
    name: str
    stack: list[str] | None = None
    cpu_parent: "Evt | None" = None


def test_a_forward_ops_come_from_moeray_lines():
    model = Transformer(tiny().replace(num_hidden_layers=1))
    model.reset_parameters(seed=0)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        model(torch.randint(0, 100, (1, 8)))
    sources = {launching_source(e) for e in prof.events() if e.name == "aten::mm"}
    assert sources and all(s.startswith("platform/") or s.startswith("kernels/") for s in sources)
    assert all(".py(" in s for s in sources), sources


def test_stack_skip_and_backward_cases():
    frames = [
        "/r/moeray/scripts/engine_step_profile.py(9): main",
        "/r/moeray/moeray/kernels/x.py(3): f",
    ]
    assert (
        launching_source(Evt("op", frames), skip="engine_step_profile")
        == "moeray/kernels/x.py(3): f"
    )
    script = Evt("/r/moeray/scripts/engine_step_profile.py(9): main")
    assert launching_source(Evt("op", [], script)) == "scripts/engine_step_profile.py(9): main"
    assert (
        launching_source(Evt("op", [], script), skip="engine_step_profile")
        == script.name  # the last resort
    )
    bwd = Evt("autograd::engine::evaluate_function: MmBackward0", None, script)
    assert launching_source(Evt("op", None, bwd)) == "bwd:MmBackward0"
    torch_frame = Evt("/venv/lib/site-packages/torch/optim/adamw.py(5): step")
    assert launching_source(Evt("op", None, torch_frame)) == "torch/optim/adamw.py(5): step"
    assert launching_source(Evt("op")) == "(no Python frame)"
