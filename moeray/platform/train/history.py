"""The run's step history (`history.jsonl`, one JSON record per step, from rank 0) and its console
line.

After a failure the job resumes from the last checkpoint, so the steps after it run again. Like
TensorBoard's `purge_step` (Megatron and torchtitan log there): on resume the records of steps at
or after the resume step are dropped from history.jsonl, and each step that runs again is written
once more with `"replay": true`. history.jsonl thus holds exactly one record per step, from the
attempt whose state the final model continues; the dropped records are kept, unchanged, in
`history.rolled_back.jsonl` (each with `rolled_back_at`, the resume step) for comparing attempts.
Records carry the job's `run_id`: a new job reusing the run directory starts a new history (the
old records go to the rolled-back file too), without marking its steps as replays.
Both files are written through the run's `storage.Storage` (a local or shared path, or an object
store), rank 0 being on any node.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from moeray.platform.train.storage import Storage


class History:
    def __init__(self, path: Storage | str | os.PathLike) -> None:
        """`path`: the history.jsonl file, a Storage or a local path."""
        self.path = path if isinstance(path, Storage) else Storage.at(path)
        stem = self.path.name.removesuffix(".jsonl")
        self.rolled_back_path = self.path.sibling(f"{stem}.rolled_back.jsonl")
        self._replayed: set[int] = set()

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def resume(self, start: int, run_id: str) -> int:
        """Start (or restart) job `run_id` at step `start`: move the records of steps >= start,
        which will run again, and those of other jobs to the rolled-back file. Returns how many
        were moved."""
        keep: list[dict[str, Any]] = []
        dropped: list[dict[str, Any]] = []
        for rec in self.records():
            ours = rec.get("run_id") == run_id
            (keep if ours and rec["step"] < start else dropped).append(rec)
        if not dropped:
            return 0
        self.rolled_back_path.append_text(
            "".join(json.dumps({**rec, "rolled_back_at": start}) + "\n" for rec in dropped)
        )
        # whole-file replace: a crash here leaves the old file or the new one, never half
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self._replayed.update(r["step"] for r in dropped if r.get("run_id") == run_id)
        return len(dropped)

    def write(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Append the record of a finished step (marked as a replay when it ran before)."""
        if rec["step"] in self._replayed:
            rec = {**rec, "replay": True}
        self.path.append_text(json.dumps(rec) + "\n")
        return rec


def step_line(rec: dict[str, Any]) -> str:
    """The console line of a step record."""
    return (
        f"step {rec['step']:>5} | loss {rec['loss']:.4f} | mtp {rec['mtp_loss']:.4f} | "
        f"{rec['tokens_per_s']:,.0f} tok/s | maxvio {rec['maxvio']:.3f} | lr {rec['lr']:.2e}"
        + (" | replay" if rec.get("replay") else "")
    )


def console(line: str) -> None:
    """Write one line to the worker's stdout, which Ray forwards to the driver. Not `print`: Ray
    Train replaces it in its workers with one that logs the text to the root logger, which writes
    it to the console, and, as a Ray worker's sys.stdout is not sys.__stdout__, prints it too: every
    line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
