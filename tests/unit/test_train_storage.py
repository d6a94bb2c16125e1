"""The run storage (train/storage.py): paths and URIs resolve to a pyarrow filesystem, an
unsupported scheme is refused by name, and files, appends, listings and transfers work the same
on the local filesystem and on one that is not (a SubTreeFileSystem: its paths are not paths of
this machine, as an object store's are not)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from moeray.platform.train.history import History
from moeray.platform.train.storage import SCHEMES, Storage


def _remote(tmp_path: Path) -> Storage:
    (tmp_path / "bucket").mkdir()
    return Storage(pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem()), "runs")


def test_paths_and_uris_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = Storage.at("runs")
    assert rel.is_local and rel.local_path == tmp_path / "runs"
    uri = Storage.at(f"file://{tmp_path}/shared")
    assert uri.is_local and str(uri) == f"{tmp_path}/shared"
    assert Storage.at("~/x").path == str(Path.home() / "x")
    run = Storage.at(str(tmp_path)).join("job")
    assert run.resolve("model").path == f"{tmp_path}/job/model"
    assert run.resolve("/elsewhere/model").path == "/elsewhere/model"


@pytest.mark.parametrize("uri", ["ftp://host/runs", "mock:///runs", "http://x/y"])
def test_unsupported_scheme_names_it_and_the_accepted_ones(uri):
    scheme = uri.split(":")[0]
    with pytest.raises(ValueError, match=f"unsupported URI scheme '{scheme}'") as e:
        Storage.at(uri)
    assert all(s in str(e.value) for s in SCHEMES)


def test_moeray_train_refuses_an_unsupported_storage_before_ray(capsys, refuse_ray_init):
    from moeray.platform.train import job

    args = ["--config", "configs/train/tiny.yaml", "--storage", "ftp://host/runs"]
    assert job.main(args) == 2
    err = capsys.readouterr().err
    assert "storage 'ftp://host/runs': unsupported URI scheme 'ftp'" in err and "s3" in err


def test_a_worker_that_cannot_see_the_run_storage_says_so(tmp_path, monkeypatch):
    """A local path that only the driver's node has: the worker's node finds no data there."""
    import ray.train

    from moeray.platform.train.job_config import TrainJobConfig
    from moeray.platform.train.loop import train_loop_per_worker

    class Context:  # Ray Train's, for world rank 0 of 1
        def get_world_rank(self):
            return 0

        def get_world_size(self):
            return 1

    monkeypatch.setattr(ray.train, "get_context", Context)
    config = {"job": TrainJobConfig().to_dict(), "run_dir": Storage.at(tmp_path), "run_id": "r"}
    with pytest.raises(RuntimeError, match=r"run storage .* is not visible on node .*s3://"):
        train_loop_per_worker(config)


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_files_appends_listings_and_transfers(tmp_path, kind):
    store = Storage.at(tmp_path / "store") if kind == "local" else _remote(tmp_path)
    run = store.join("job")
    assert not run.exists() and run.children() == []
    run.join("a", "b.txt").write_text("hello")
    assert run.join("a", "b.txt").read_text() == "hello"
    assert (run / "a" / "b.txt").read_text() == "hello"  # `/` joins as on a Path
    run.join("h.jsonl").append_text("1\n")
    run.join("h.jsonl").append_text("2\n")
    assert run.join("h.jsonl").read_text() == "1\n2\n"
    for step in (12, 3):
        run.join(f"step_{step:07d}").join("meta.json").write_text("{}")
    assert [c.name for c in run.children("step_*")] == ["step_0000003", "step_0000012"]

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.bin").write_bytes(b"\x00\x01")
    (src / "sub" / "y.txt").write_text("y")
    run.join("up").upload(src)
    scratch = tmp_path / "scratch"
    got = run.join("up").local_copy(scratch)
    assert (got / "x.bin").read_bytes() == b"\x00\x01"
    assert (got / "sub" / "y.txt").read_text() == "y"
    one = run.join("up", "sub", "y.txt").local_copy(scratch)
    if kind == "local":  # read in place, nothing copied
        assert one == tmp_path / "store" / "job" / "up" / "sub" / "y.txt"
        assert not scratch.exists()
    else:  # downloaded into the scratch directory; the store's paths are not local paths
        assert one == scratch / "y.txt" and one.read_text() == "y"
        assert (tmp_path / "bucket" / "runs" / "job" / "up" / "x.bin").exists()
        assert not Path(run.path).exists()
        with pytest.raises(TypeError, match="not on the local filesystem"):
            Path(run)
    with pytest.raises(FileNotFoundError, match="missing"):
        run.join("missing").local_copy(scratch)


def test_history_resumes_through_a_remote_storage(tmp_path):
    run = _remote(tmp_path).join("job")
    h = History(run.join("history.jsonl"))
    for step in range(4):
        h.write({"step": step, "run_id": "a"})
    h2 = History(run.join("history.jsonl"))  # a restarted rank 0, on any node
    assert h2.resume(2, "a") == 2
    assert h2.write({"step": 2, "run_id": "a"})["replay"] is True
    base = tmp_path / "bucket" / "runs" / "job"
    recs = [json.loads(x) for x in (base / "history.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("replay", False)) for r in recs] == [(0, 0), (1, 0), (2, 1)]
    rolled = (base / "history.rolled_back.jsonl").read_text().splitlines()
    assert [json.loads(x)["rolled_back_at"] for x in rolled] == [2, 2]
