"""Which source line launched a profiled op: for the kernel tables of the profiling scripts
(scripts/engine_step_profile.py, scripts/train_step_profile.py)."""

from __future__ import annotations


def launching_source(evt, skip: str = "") -> str:
    """The innermost moeray frame above a torch.profiler event (a profile taken with
    `with_stack=True`), as "path.py(line): name" from moeray/ on: from the event's recorded
    stack where torch fills it, else from its ancestors, which with_stack makes Python-function
    events (torch 2.11-2.13 leave `evt.stack` empty unless the profile's experimental config is
    verbose); else the backward node that ran it; else the innermost Python frame (torch's
    optimizer, clipping). Frames whose text holds `skip` (the calling script: a checkout named
    moeray puts moeray/ in its path too) are passed over."""

    def ours(frame: str) -> bool:
        return "moeray/" in frame and not (skip and skip in frame)

    frames = [f for f in (evt.stack or []) if ours(f)]
    if frames:
        return frames[0].split("moeray/", 1)[1]
    parent, python = evt.cpu_parent, None
    while parent is not None:
        name = parent.name
        if name.startswith("autograd::engine::evaluate_function: "):
            return "bwd:" + name.split(": ", 1)[1]
        if ours(name):
            return name.split("moeray/", 1)[1]
        if python is None and ".py(" in name:
            python = name.rsplit("site-packages/", 1)[-1]
        parent = parent.cpu_parent
    return python or "(no Python frame)"
