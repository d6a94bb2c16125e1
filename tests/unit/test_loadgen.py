"""`moeray bench serve` (serve/bench.py, serve/loadgen.py) against the real in-process OpenAI
server of test_openai_schemas.py (uvicorn + the deterministic EchoEngine)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from moeray.platform.serve import bench
from moeray.platform.serve import loadgen as B

_spec = importlib.util.spec_from_file_location(
    "moeray_test_openai_server", Path(__file__).with_name("test_openai_schemas.py")
)
srv = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = srv  # dataclasses look their module up while the class is created
_spec.loader.exec_module(srv)


@dataclass
class CountingEngine(srv.EchoEngine):
    """EchoEngine that also records the most requests it ever had in flight."""

    max_live: int = 0
    prompts: list[tuple[int, ...]] = field(default_factory=list)

    async def generate(self, request):
        self.prompts.append(request.prompt_ids)
        inner = super().generate(request)
        try:
            async for step in inner:
                self.max_live = max(self.max_live, len(self.live))
                yield step
        finally:
            await inner.aclose()  # `async for` does not close what it iterates


def test_length_distributions():
    rng = random.Random(0)
    assert B.LengthDist.parse("37").sample(rng) == 37
    u = B.LengthDist.parse("uniform:3:9")
    xs = [u.sample(rng) for _ in range(2000)]
    assert set(xs) == set(range(3, 10))
    ln = B.LengthDist.parse("lognormal:200:0.5")
    ys = [ln.sample(rng) for _ in range(4000)]
    assert statistics.median(ys) == pytest.approx(200, rel=0.06)
    assert statistics.fmean(ys) == pytest.approx(200 * math.exp(0.125), rel=0.06)
    n = B.LengthDist.parse("normal:5:20", max_len=12)
    zs = [n.sample(rng) for _ in range(1000)]
    assert min(zs) == 1 and max(zs) == 12  # clipped to [1, max_len]
    for bad in (
        "",
        "x",
        "0",
        "uniform:9:3",
        "uniform:0:3",
        "poisson:3:4",
        "normal:5",
        "normal:a:b",
        "lognormal:-1:1",
    ):
        with pytest.raises(ValueError):
            B.LengthDist.parse(bad)


def test_make_requests_is_deterministic_and_exact():
    cfg = B.BenchConfig(
        model="tiny",
        num_requests=30,
        input_len=B.LengthDist.parse("uniform:5:50"),
        output_len=B.LengthDist.parse("uniform:1:9"),
        token_range=(97, 123),
        seed=4,
    )
    a, b = B.make_requests(cfg), B.make_requests(cfg)
    assert [x for x, _ in a] == [x for x, _ in b]
    for body, rec in a:
        assert len(body["prompt"]) == rec.input_tokens and 5 <= rec.input_tokens <= 50
        assert all(97 <= t < 123 for t in body["prompt"])
        assert body["max_tokens"] == rec.requested_output and body["stream"] and body["ignore_eos"]
    chat = B.make_requests(B.BenchConfig(model="tiny", endpoint="chat", num_requests=2))
    assert len(chat[0][0]["messages"][0]["content"].split()) == 128
    with pytest.raises(ValueError, match="rate"):
        B.BenchConfig(model="m", rate=0)
    with pytest.raises(ValueError, match="endpoint"):
        B.BenchConfig(model="m", endpoint="embeddings")


def test_fixed_concurrency_timings_and_goodput():
    engine = CountingEngine(delay_s=0.01, steps=(1,))
    _, app = srv.make_server(engine)
    cfg = B.BenchConfig(
        model="tiny",
        num_requests=16,
        concurrency=4,
        input_len=B.LengthDist.parse("uniform:4:20"),
        output_len=B.LengthDist.parse("6"),
        token_range=(97, 123),
        seed=1,
    )
    with srv.serve_app(app) as url:
        records, wall = B.asyncio.run(B.run_load(url, cfg))
    assert all(r.ok for r in records), [r.error for r in records]
    assert engine.max_live == 4  # exactly the configured concurrency
    assert sorted(len(p) for p in engine.prompts) == sorted(r.input_tokens for r in records)
    res = B.summarize(records, wall, cfg)
    assert res["completed"] == 16 and res["output_tokens"] == 96 and res["failed"] == 0
    # each token takes >= 10 ms in the engine; 4 rounds of 4 requests x 6 tokens >= 240 ms
    assert wall >= 0.24
    assert res["ttft_p50_ms"] >= 10 and res["tpot_p50_ms"] >= 9.5 and res["itl_p50_ms"] >= 9.5
    assert res["tpot_p50_ms"] <= res["tpot_p90_ms"] <= res["tpot_p99_ms"]
    assert res["throughput_tokens_per_s"] == pytest.approx(96 / wall)
    tpots = sorted((r.e2e_s - r.ttft_s) / 5 * 1000 for r in records)
    assert res["tpot_p50_ms"] == pytest.approx((tpots[7] + tpots[8]) / 2)
    # goodput: every request meets loose targets, none meets a 1 ms TTFT target
    assert res["goodput"] == pytest.approx(16 / wall)
    loose_ttft = max(r.ttft_s for r in records) * 1000
    tight = B.summarize(records, wall, B.BenchConfig(model="tiny", ttft_slo_ms=1.0))
    assert tight["goodput"] == 0 and tight["slo_attainment"] == 0
    median_tpot = statistics.median(r.tpot_s for r in records) * 1000
    half = B.summarize(
        records, wall, B.BenchConfig(model="tiny", ttft_slo_ms=loose_ttft, tpot_slo_ms=median_tpot)
    )
    assert half["goodput"] * wall == pytest.approx(
        sum(r.tpot_s * 1000 <= median_tpot for r in records)
    )


def test_poisson_arrivals_and_429():
    engine = CountingEngine(delay_s=0.005, steps=(1, 2))
    _, app = srv.make_server(engine, max_in_flight=2)
    cfg = B.BenchConfig(
        model="tiny",
        num_requests=24,
        rate=40.0,
        output_len=B.LengthDist("fixed", 4),
        input_len=B.LengthDist("fixed", 8),
        token_range=(97, 123),
        seed=2,
    )
    with srv.serve_app(app) as url:
        records, wall = B.asyncio.run(B.run_load(url, cfg))
    starts = sorted(r.start for r in records)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert 0.010 < statistics.fmean(gaps) < 0.060  # 1 / 40 = 25 ms between arrivals on average
    assert max(gaps) > 2 * min(gaps)  # exponential, not evenly spaced
    res = B.summarize(records, wall, cfg)
    assert res["completed"] + res["failed"] == 24 and res["completed"] > 0
    assert res["rejected_429"] == res["failed"]
    # a burst against a 2-slot server: overflowing requests come back as 429, not queued forever
    burst = B.BenchConfig(
        model="tiny",
        num_requests=12,
        concurrency=6,
        output_len=B.LengthDist("fixed", 30),
        input_len=B.LengthDist("fixed", 5),
    )
    with srv.serve_app(app) as url:
        res = B.summarize(*B.asyncio.run(B.run_load(url, burst)), burst)
    assert res["rejected_429"] > 0 and res["completed"] > 0
    assert res["completed"] + res["rejected_429"] == 12


def test_main_writes_both_setups_and_keeps_earlier_ones(tmp_path, monkeypatch, capsys):
    _, app = srv.make_server(srv.EchoEngine(delay_s=0.002), api_key="k3y")
    monkeypatch.setenv("MOERAY_API_KEY", "k3y")
    with srv.serve_app(app) as url:
        argv = [
            "--target",
            f"colocated={url}",
            "--target",
            f"pd={url}",
            "--model",
            "tiny",
            "--num-requests",
            "6",
            "--concurrency",
            "3",
            "--input-len",
            "uniform:4:12",
            "--output-len",
            "5",
            "--token-range",
            "97:123",
            "--results-dir",
            str(tmp_path),
            "--out",
            "serve-test",
        ]
        assert bench.main(argv) == 0
        data = json.loads((tmp_path / "serve-test.json").read_text())
        for key in ("colocated", "pd"):
            for k in (
                "throughput_tokens_per_s",
                "ttft_p50_ms",
                "ttft_p99_ms",
                "tpot_p50_ms",
                "tpot_p99_ms",
                "goodput",
            ):
                assert isinstance(data[key][k], float) and data[key][k] > 0, (key, k)
            assert data[key]["completed"] == 6 and data[key]["output_tokens"] == 30
        assert {"device", "date", "command"} <= set(data)
        pd_before = data["pd"]
        assert bench.main(argv[:2] + argv[4:] + ["--tpot-slo-ms", "0.001"]) == 0
        data = json.loads((tmp_path / "serve-test.json").read_text())
        assert data["colocated"]["goodput"] == 0  # re-measured with an impossible target
        assert data["pd"] == pd_before  # not re-run: kept from the earlier run
        monkeypatch.delenv("MOERAY_API_KEY")
        assert bench.main(argv[:2] + argv[4:]) == 1  # no key: every request gets 401
        data = json.loads((tmp_path / "serve-test.json").read_text())
        assert data["colocated"]["completed"] == 0 and "401" not in str(data["colocated"]["errors"])
        assert "API key" in str(data["colocated"]["errors"])
    assert "colocated" in capsys.readouterr().out
    assert bench.main(["--target", "nourl", "--model", "m"]) == 2
