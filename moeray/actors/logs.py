"""Logging in moeray's actor processes.

Ray leaves a worker's root logger at WARNING with no handler, so a `moeray.*` logger's INFO
records (an expert placement change, a gang staging it) would be dropped. An actor whose INFO
records are worth keeping calls `log_to_stderr()` in its constructor: the records then go to the
actor's stderr, which Ray writes to the worker's `.err` log file (and to the driver with
log_to_driver).
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_stderr(level: int = logging.INFO) -> logging.Logger:
    """Send the `moeray` loggers' records at `level` and above to stderr; once per process
    (a second call only sets the level)."""
    logger = logging.getLogger("moeray")
    logger.setLevel(level)
    if not any(getattr(h, "moeray_stderr", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.moeray_stderr = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    return logger
