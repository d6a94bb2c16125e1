"""Benchmark result files: `benchmarks/results/<name>.json` with device, date and command."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform as _platform
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(os.environ.get("MOERAY_RESULTS_DIR", "benchmarks/results"))


def device_name() -> str:
    """A short device label for file names: the CUDA device name, else the CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"cpu-{_platform.machine()}"


def device_slug() -> str:
    return "".join(c if c.isalnum() else "-" for c in device_name().lower()).strip("-")


def write_result(
    name: str, numbers: dict[str, Any], *, directory: Path | None = None, command: str | None = None
) -> Path:
    """Write numbers plus device, date and command to `<directory>/<name>.json`; return the path.
    `command`: how the run was started, when not a `moeray` subcommand (scripts)."""
    out_dir = Path(directory) if directory is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "device": device_name(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command
        if command is not None
        else (" ".join(["moeray", *sys.argv[1:]]) if sys.argv else ""),
        **numbers,
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path
