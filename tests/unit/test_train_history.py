"""history.jsonl across a resume: one record per step, replays marked, the rolled-back records
kept aside; and the rank-0 console line printed once under Ray Train's print patch."""

from __future__ import annotations

import builtins
import io
import json
import logging
import sys

from ray.train.v2._internal.logging.patch_print import redirected_print

from moeray.platform.train.history import History, console, step_line


def _rec(step: int, loss: float, run_id: str = "run-a") -> dict:
    return {
        "step": step,
        "loss": loss,
        "mtp_loss": 0.5,
        "tokens_per_s": 1000.0,
        "maxvio": 0.1,
        "lr": 1e-3,
        "run_id": run_id,
    }


def test_resume_keeps_one_record_per_step_and_marks_replays(tmp_path):
    h = History(tmp_path / "history.jsonl")
    assert h.resume(0, "run-a") == 0  # a fresh run: nothing to drop
    for step in range(5):  # attempt 1: steps 0..4, then killed; the checkpoint is after step 2
        h.write(_rec(step, 10.0 - step))
    h2 = History(tmp_path / "history.jsonl")  # attempt 2, a new worker process
    assert h2.resume(3, "run-a") == 2
    for step in range(3, 8):
        h2.write(_rec(step, 20.0 - step))
    recs = h2.records()
    assert [r["step"] for r in recs] == list(range(8))
    assert [r.get("replay", False) for r in recs] == [False] * 3 + [True] * 2 + [False] * 3
    assert [r["loss"] for r in recs[3:5]] == [17.0, 16.0]  # the replayed values, not the old
    rolled = [json.loads(x) for x in h2.rolled_back_path.read_text().splitlines()]
    assert [(r["step"], r["loss"], r["rolled_back_at"]) for r in rolled] == [
        (3, 7.0, 3),
        (4, 6.0, 3),
    ]
    # A restart before any checkpoint replays from step 0.
    h3 = History(tmp_path / "history.jsonl")
    assert h3.resume(0, "run-a") == 8
    assert h3.write(_rec(0, 1.0))["replay"] is True


def test_a_new_job_in_the_same_directory_starts_a_new_history(tmp_path):
    h = History(tmp_path / "history.jsonl")
    for step in range(3):
        h.write(_rec(step, 1.0, "old-job"))
    h2 = History(tmp_path / "history.jsonl")
    assert h2.resume(0, "new-job") == 3
    assert "replay" not in h2.write(_rec(0, 2.0, "new-job"))
    assert [(r["step"], r["run_id"]) for r in h2.records()] == [(0, "new-job")]


def test_step_line_marks_a_replay():
    assert step_line(_rec(7, 2.5)).startswith("step     7 | loss 2.5000 | mtp 0.5000 |")
    assert not step_line(_rec(7, 2.5)).endswith("replay")
    assert step_line({**_rec(7, 2.5), "replay": True}).endswith("| replay")


def test_console_line_appears_once_under_ray_trains_print_patch(monkeypatch):
    """Ray Train's worker: print replaced by `redirected_print`, the root logger writing to the
    console, and sys.stdout not sys.__stdout__ (as in a Ray worker)."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(builtins, "print", redirected_print)
    handler = logging.StreamHandler(out)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        print("via print")
        console("via console")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = out.getvalue()
    assert text.count("via print") == 2  # the doubling the job's console showed
    assert text.count("via console") == 1
