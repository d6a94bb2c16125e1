"""`spawn(fn, args, nprocs)`: torch.multiprocessing.spawn's call (fn(rank, *args) in nprocs
processes, joined, a rank's exception raised here), the processes forked from a fork server instead
of started afresh.

A spawned process spends ~1.6 s of CPU importing torch and moeray before it runs a line of the
test (on 2 cores a 4-rank test waited ~4 s for that alone); the fork server imports them once for
the whole session and every rank is a fork of it: the EP engine test's 4 ranks took 0.7 s instead
of 3.9. The server is a fresh interpreter, not a fork of the test process: no Ray connection,
monkeypatch or thread of the tests reaches the ranks. Each rank starts in the caller's working
directory and sys.path (multiprocessing sends them) and with the caller's environment as of the
call (sent here; the server's own is that of its start), as a spawned one would."""

import os
import tempfile

import torch.multiprocessing as mp

# Imported by the server when it starts (the first call), shared by every rank forked from it.
_PRELOAD = ["torch", "torch.distributed", "moeray.platform.model.transformer", "pytest"]


def _rank(rank: int, environ: dict[str, str], fn, args: tuple) -> None:
    os.environ.clear()
    os.environ.update(environ)
    fn(rank, *args)


def spawn(fn, args: tuple = (), nprocs: int = 1, join: bool = True):
    """mp.spawn's arguments and result (None, or the ProcessContext without join); a test may
    put it in place of torch.multiprocessing.spawn for code that starts its own ranks."""
    mp.set_forkserver_preload(_PRELOAD)  # read once, when the server starts
    return mp.start_processes(
        _rank,
        args=(dict(os.environ), fn, args),
        nprocs=nprocs,
        join=join,
        start_method="forkserver",
    )


def init_file(directory) -> str:
    """A path no process group has used, for `file://` init of one spawn's ranks. torch's FileStore
    needs a new (absent or empty) file per initialization: its ranks delete the file as they shut
    down, and a file a run left behind hands the next run's ranks the old run's gloo addresses
    (connect refused, then a timeout) if a rank exited before its FileStore was destroyed."""
    return os.path.join(tempfile.mkdtemp(prefix="pg-", dir=directory), "store")
