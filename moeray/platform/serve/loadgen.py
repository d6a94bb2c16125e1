"""An OpenAI-API load generator: request bodies, the streaming client, and the summary.

Sends streaming requests to one base URL, with Poisson arrivals at `rate` requests/s or a fixed
`concurrency`, prompt and output lengths drawn from distributions (`LengthDist`), and summarizes:
    throughput (output tokens/s, requests/s), TTFT, TPOT, ITL and end-to-end p50/p90/p99 (ms),
    goodput: requests/s that met both the TTFT and the TPOT target (DistServe's definition),
    failures (429 rejections separately).
`moeray bench serve` (serve/bench.py) runs it against targets or deployments it launches.

Prompts for /v1/completions are random token ids (exact lengths without knowing the tokenizer;
`token_range` must lie inside the model's vocabulary); /v1/chat/completions gets random words.
Requests set `ignore_eos` so that output lengths follow the distribution (`ignore_eos=False` for
servers without that vLLM extension); TPOT uses the server's reported completion tokens.
Timings: TTFT = first streamed chunk; ITL = gap between chunks (an MTP step that emits several
tokens is one chunk); TPOT = (e2e - TTFT) / (output tokens - 1).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

DIST_KINDS = ("fixed", "uniform", "normal", "lognormal")


@dataclass(frozen=True)
class LengthDist:
    """Token-length distribution, parsed from `N`, `uniform:LO:HI`, `normal:MEAN:STD` or
    `lognormal:MEDIAN:SIGMA`; samples are rounded and clipped to [1, max_len]."""

    kind: str
    a: float
    b: float = 0.0
    max_len: int = 1 << 20

    def __post_init__(self) -> None:
        if self.kind not in DIST_KINDS:
            raise ValueError(f"length distribution {self.kind!r}; accepted: {DIST_KINDS}")
        if self.kind == "fixed" and (self.a < 1 or self.a != int(self.a)):
            raise ValueError(f"fixed length {self.a} must be an integer >= 1")
        if self.kind == "uniform" and not 1 <= self.a <= self.b:
            raise ValueError(f"uniform:{self.a}:{self.b} needs 1 <= LO <= HI")
        if self.kind in ("normal", "lognormal") and not (self.a > 0 and self.b >= 0):
            raise ValueError(f"{self.kind}:{self.a}:{self.b} needs a positive center, spread >= 0")
        if self.max_len < 1:
            raise ValueError(f"max_len {self.max_len} must be >= 1")

    @staticmethod
    def parse(spec: str, max_len: int = 1 << 20) -> LengthDist:
        parts = spec.strip().split(":")
        if len(parts) == 1 and parts[0].isdigit():
            return LengthDist("fixed", float(parts[0]), max_len=max_len)
        if len(parts) == 3:
            try:
                a, b = float(parts[1]), float(parts[2])
            except ValueError:
                pass
            else:
                return LengthDist(parts[0], a, b, max_len=max_len)
        raise ValueError(
            f"length spec {spec!r}: expected N, uniform:LO:HI, normal:MEAN:STD or "
            "lognormal:MEDIAN:SIGMA"
        )

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            x = self.a
        elif self.kind == "uniform":
            x = rng.randint(int(self.a), int(self.b))
        elif self.kind == "normal":
            x = rng.gauss(self.a, self.b)
        else:
            x = self.a * math.exp(rng.gauss(0.0, self.b))
        return int(min(self.max_len, max(1, round(x))))


@dataclass(frozen=True)
class BenchConfig:
    model: str
    endpoint: str = "completions"  # or "chat"
    num_requests: int = 100
    rate: float | None = None  # Poisson arrivals (requests/s); None: fixed concurrency
    concurrency: int = 8
    input_len: LengthDist = LengthDist("fixed", 128)
    output_len: LengthDist = LengthDist("fixed", 128)
    ttft_slo_ms: float = 1000.0
    tpot_slo_ms: float = 100.0
    api_key: str | None = None
    token_range: tuple[int, int] = (32, 127)  # byte-level BPE vocabularies hold every byte
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int = 0
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint {self.endpoint!r}; accepted: completions, chat")
        if self.num_requests < 1 or self.concurrency < 1:
            raise ValueError(
                f"num_requests={self.num_requests} and concurrency={self.concurrency} must be >= 1"
            )
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate={self.rate} must be > 0 requests/s (or None)")
        if not (self.ttft_slo_ms > 0 and self.tpot_slo_ms > 0):
            raise ValueError("SLO targets must be > 0 ms")
        lo, hi = self.token_range
        if not 0 <= lo < hi:
            raise ValueError(f"token_range {self.token_range} must satisfy 0 <= LO < HI")


@dataclass
class RequestRecord:
    input_tokens: int
    requested_output: int
    ok: bool = False
    status: int = 0
    error: str = ""
    output_tokens: int = 0
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    itl_s: list[float] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0

    @property
    def tpot_s(self) -> float:
        if not self.ok or self.output_tokens < 2:
            return math.nan
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def _prompt(cfg: BenchConfig, rng: random.Random, n_tokens: int) -> Any:
    if cfg.endpoint == "completions":
        lo, hi = cfg.token_range
        return [rng.randrange(lo, hi) for _ in range(n_tokens)]
    words = ("alpha", "beta", "gamma", "delta", "expert", "router", "token", "cache", "page")
    return " ".join(rng.choice(words) for _ in range(n_tokens))


def make_requests(cfg: BenchConfig) -> list[tuple[dict[str, Any], RequestRecord]]:
    """The request bodies (deterministic in cfg.seed) and their empty records."""
    rng = random.Random(cfg.seed)
    out = []
    for _ in range(cfg.num_requests):
        n_in, n_out = cfg.input_len.sample(rng), cfg.output_len.sample(rng)
        body: dict[str, Any] = {
            "model": cfg.model,
            "max_tokens": n_out,
            "temperature": cfg.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if cfg.ignore_eos:
            body["ignore_eos"] = True
        if cfg.endpoint == "completions":
            body["prompt"] = _prompt(cfg, rng, n_in)
        else:
            body["messages"] = [{"role": "user", "content": _prompt(cfg, rng, n_in)}]
        out.append((body, RequestRecord(n_in, n_out)))
    return out


async def _send(
    session: Any, url: str, headers: dict[str, str], body: dict[str, Any], rec: RequestRecord
) -> None:
    rec.start = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            rec.status = resp.status
            if resp.status != 200:
                rec.error = (await resp.text())[:300]
                return
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    rec.ok = rec.error == ""
                    break
                event = json.loads(data)
                if "error" in event:
                    rec.error = str(event["error"].get("message", event["error"]))[:300]
                    continue
                now = time.perf_counter()
                if event.get("choices"):
                    chunks += 1
                    if last is None:
                        rec.ttft_s = now - rec.start
                    else:
                        rec.itl_s.append(now - last)
                    last = now
                usage = event.get("usage")
                if usage:
                    rec.output_tokens = int(usage["completion_tokens"])
            if rec.ok and rec.output_tokens == 0:
                rec.output_tokens = chunks  # a server without usage: one token per chunk
    except (TimeoutError, OSError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"[:300]
        rec.ok = False
    finally:
        rec.end = time.perf_counter()
        rec.e2e_s = rec.end - rec.start
        if rec.ok and last is None:
            rec.ok, rec.error = False, "stream ended without a token"


async def run_load(base_url: str, cfg: BenchConfig) -> tuple[list[RequestRecord], float]:
    """Send every request; return the records and the wall time from first send to last end."""
    import aiohttp

    endpoint = "/v1/completions" if cfg.endpoint == "completions" else "/v1/chat/completions"
    url = base_url.rstrip("/") + endpoint
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    requests = make_requests(cfg)
    arrivals = random.Random(cfg.seed + 1)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    # limit=0: no client-side pool limit, or Poisson arrivals would queue in the client
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()
        if cfg.rate is not None:
            tasks = []
            for i, (body, rec) in enumerate(requests):
                if i:
                    await asyncio.sleep(arrivals.expovariate(cfg.rate))
                tasks.append(asyncio.create_task(_send(session, url, headers, body, rec)))
            await asyncio.gather(*tasks)
        else:
            queue = list(reversed(requests))

            async def worker() -> None:
                while queue:
                    body, rec = queue.pop()
                    await _send(session, url, headers, body, rec)

            await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, len(queue)))))
        wall = time.perf_counter() - t0
    return [rec for _, rec in requests], wall


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """p50/p90/p99/mean of the non-NaN values times scale; None (JSON null) when there are none."""
    import numpy as np

    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    p50, p90, p99 = np.percentile(v, [50, 90, 99]) * scale
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(v.mean() * scale),
    }


def summarize(records: list[RequestRecord], wall_s: float, cfg: BenchConfig) -> dict[str, Any]:
    """Throughput, latency percentiles (ms) and goodput of one run."""
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.input_tokens for r in ok)
    ttft = percentiles([r.ttft_s for r in ok])
    tpot = percentiles([r.tpot_s for r in ok])
    itl = percentiles([x for r in ok for x in r.itl_s])
    e2e = percentiles([r.e2e_s for r in ok])
    # A one-token answer has no TPOT: it meets the TPOT target trivially.
    good = [
        r
        for r in ok
        if r.ttft_s * 1000 <= cfg.ttft_slo_ms
        and (math.isnan(r.tpot_s) or r.tpot_s * 1000 <= cfg.tpot_slo_ms)
    ]
    res: dict[str, Any] = {
        "throughput_tokens_per_s": out_tokens / wall_s,
        "input_tokens_per_s": in_tokens / wall_s,
        "requests_per_s": len(ok) / wall_s,
        "goodput": len(good) / wall_s,
        "slo_attainment": len(good) / len(records),
        "ttft_slo_ms": cfg.ttft_slo_ms,
        "tpot_slo_ms": cfg.tpot_slo_ms,
        "num_requests": len(records),
        "completed": len(ok),
        "rejected_429": sum(r.status == 429 for r in records),
        "failed": len(records) - len(ok),
        "output_tokens": out_tokens,
        "input_tokens": in_tokens,
        "duration_s": wall_s,
        "mode": f"poisson rate={cfg.rate}/s"
        if cfg.rate is not None
        else f"concurrency={cfg.concurrency}",
        "endpoint": cfg.endpoint,
    }
    for name, p in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        for k, v in p.items():
            res[f"{name}_{k}_ms"] = v
    errors = sorted({r.error for r in records if r.error})
    if errors:
        res["errors"] = errors[:5]
    return res
