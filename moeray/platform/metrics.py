"""Every metric moeray records, defined once: name, help, kind, labels, buckets.

Serving code (Ray actors and Serve deployments) records through `ray.util.metrics`, which Ray
exports on each node's metrics endpoint with a `ray_` prefix; code that runs outside Ray (the
training progress line, the test server) records through `prometheus_client`, which exports the
bare name. Both go through `Metrics`, so a name, label set or bucket layout cannot drift between
the code that records a metric, the dashboards (`moeray.platform.dashboards`) and the alerts.

Exported series names (what PromQL must query), for a definition named `moeray_x`:
    runtime "ray":        ray_moeray_x            (gauge)
                          ray_moeray_x_total      (counter: the Prometheus exporter adds `_total`)
                          ray_moeray_x_bucket/_sum/_count   (histogram)
    runtime "prometheus": the same without the `ray_` prefix.

Ray adds per-process labels (WorkerId, NodeAddress, ...), so panels aggregate with
`sum by (...)`. Ray 2.58's exporter keeps histogram buckets exactly but reports `_sum` from bucket
midpoints (one 0.2 s observation shows as 0.175), so quantiles come from `_bucket`, not `_sum`.

Neither torch nor ray nor prometheus_client is imported at module import: the backends are
imported inside `Metrics` when the first metric object is created.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

MetricKind = Literal["counter", "gauge", "histogram"]
Runtime = Literal["ray", "prometheus"]
KINDS: tuple[str, ...] = ("counter", "gauge", "histogram")
RUNTIMES: tuple[str, ...] = ("ray", "prometheus")
RAY_PREFIX = "ray_"

_NAME_RE = re.compile(r"^moeray_[a-z][a-z0-9_]*[a-z0-9]$")
_LABEL_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# Labels Prometheus attaches itself; a metric that declared one would be overwritten. (Ray's own
# labels, Component/NodeAddress/SessionName/Version/WorkerId, are capitalized: _LABEL_RE excludes
# them.)
_RESERVED_LABELS = frozenset({"le", "quantile", "job", "instance"})

# Latency buckets (seconds). TTFT spans a cached short prompt (~5 ms) to a 128K-token prefill
# queued behind others (tens of seconds); per-token latencies span MTP-accelerated decode of a
# tiny model (~1 ms) to a loaded 671B decode step (~100-500 ms); end-to-end spans one token to a
# long generation (minutes).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
# One KV transfer moves a prompt's latent cache: 70,272 B/token for V3 (docs/deepseek-v3.md), so
# 1K-128K tokens is 70 MB-9 GB; at 25-400 GB/s NVLink/RDMA that is ~0.2 ms-0.4 s, over gloo/TCP
# seconds.
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


@dataclass(frozen=True)
class MetricDef:
    """One metric. `unit` and `group` are for dashboards: the panel's axis unit and its row."""

    name: str
    help: str
    kind: MetricKind
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    unit: str = "none"  # Grafana unit id: "s", "bytes", "short", "percentunit", "none"
    group: str = "serving"

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(
                f"metric name {self.name!r} must match {_NAME_RE.pattern} (prefix moeray_, "
                "lower-case letters, digits and underscores)"
            )
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.name}: kind {self.kind!r}; accepted: {KINDS}")
        if self.kind == "counter" and self.name.endswith("_total"):
            # Both exporters append `_total` to counters; a name ending in it would be exported as
            # `..._total_total` by Ray.
            raise ValueError(f"counter {self.name!r} must not end in _total (exporters add it)")
        if not self.help.strip():
            raise ValueError(f"metric {self.name}: help text is empty")
        if not isinstance(self.labels, tuple) or len(set(self.labels)) != len(self.labels):
            raise ValueError(
                f"metric {self.name}: labels {self.labels!r} must be a tuple of unique names"
            )
        for label in self.labels:
            if not _LABEL_RE.match(label) or label in _RESERVED_LABELS:
                raise ValueError(
                    f"metric {self.name}: label {label!r} must match {_LABEL_RE.pattern} "
                    f"and not be one of {sorted(_RESERVED_LABELS)}"
                )
        if self.kind == "histogram":
            b = self.buckets
            if (
                not b
                or any(not math.isfinite(x) or x <= 0 for x in b)
                or any(b[i] >= b[i + 1] for i in range(len(b) - 1))
            ):
                raise ValueError(
                    f"histogram {self.name}: buckets {b!r} must be finite, positive and strictly "
                    "increasing (Ray rejects non-positive boundaries)"
                )
        elif self.buckets:
            raise ValueError(
                f"metric {self.name}: buckets are only for histograms, not {self.kind}"
            )

    def exported_name(self, runtime: Runtime = "ray") -> str:
        """The base series name as scraped: `ray_` prefix under Ray, `_total` for counters."""
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime {runtime!r}; accepted: {RUNTIMES}")
        base = (RAY_PREFIX if runtime == "ray" else "") + self.name
        return base + "_total" if self.kind == "counter" else base

    def series(self, runtime: Runtime = "ray") -> tuple[str, ...]:
        """Every series name this metric produces (histograms: _bucket, _sum, _count)."""
        base = self.exported_name(runtime)
        if self.kind == "histogram":
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)


# ---- serving: ingress (per request, measured where the client sees it) -----------------------
_MODEL = ("model",)
TTFT = MetricDef(
    "moeray_ttft_seconds",
    "Time to first token: request arrival at the ingress to the first generated token leaving it.",
    "histogram",
    _MODEL,
    TTFT_BUCKETS,
    "s",
)
TPOT = MetricDef(
    "moeray_tpot_seconds",
    "Time per output token after the first, per request: (e2e - ttft) / (generated tokens - 1).",
    "histogram",
    _MODEL,
    TOKEN_BUCKETS,
    "s",
)
ITL = MetricDef(
    "moeray_inter_token_latency_seconds",
    "Time between consecutive streamed chunks of one request "
    "(an MTP step that accepts drafts emits several tokens in one chunk).",
    "histogram",
    _MODEL,
    TOKEN_BUCKETS,
    "s",
)
E2E = MetricDef(
    "moeray_e2e_latency_seconds",
    "Request arrival to the last token (or the error).",
    "histogram",
    _MODEL,
    E2E_BUCKETS,
    "s",
)
REQUESTS = MetricDef(
    "moeray_requests",
    "Finished API requests by endpoint and HTTP status (429 = admission "
    "rejected, 400 = invalid body or over the context limit, 499 = client disconnected).",
    "counter",
    ("model", "endpoint", "status"),
    unit="short",
)
PROMPT_TOKENS = MetricDef(
    "moeray_prompt_tokens", "Prompt tokens of admitted requests.", "counter", _MODEL, unit="short"
)
GENERATION_TOKENS = MetricDef(
    "moeray_generation_tokens", "Generated (completion) tokens.", "counter", _MODEL, unit="short"
)

# ---- serving: engine replicas ------------------------------------------------------------------
_DEPLOYMENT = ("deployment", "replica")
RUNNING = MetricDef(
    "moeray_running_requests",
    "Requests in the running batch of a replica.",
    "gauge",
    _DEPLOYMENT,
    unit="short",
)
WAITING = MetricDef(
    "moeray_waiting_requests",
    "Requests queued in a replica, waiting for a batch slot or KV pages.",
    "gauge",
    _DEPLOYMENT,
    unit="short",
)
KV_USED = MetricDef(
    "moeray_kv_pages_used",
    "KV cache pages in use on a replica.",
    "gauge",
    _DEPLOYMENT,
    unit="short",
    group="kv",
)
KV_FREE = MetricDef(
    "moeray_kv_pages_free",
    "KV cache pages free on a replica.",
    "gauge",
    _DEPLOYMENT,
    unit="short",
    group="kv",
)
KV_TRANSFER_BYTES = MetricDef(
    "moeray_kv_transfer_bytes",
    "Bytes of KV cache moved from prefill to decode replicas.",
    "counter",
    ("transport",),
    unit="bytes",
    group="kv",
)
KV_TRANSFER_SECONDS = MetricDef(
    "moeray_kv_transfer_seconds",
    "Duration of one prefill-to-decode KV transfer.",
    "histogram",
    ("transport",),
    TRANSFER_BUCKETS,
    "s",
    group="kv",
)
MTP_DRAFT = MetricDef(
    "moeray_mtp_draft_tokens",
    "Tokens drafted by the MTP module in decode.",
    "counter",
    ("deployment",),
    unit="short",
    group="kv",
)
MTP_ACCEPTED = MetricDef(
    "moeray_mtp_accepted_tokens",
    "MTP draft tokens accepted by verification; acceptance = rate(accepted) / rate(draft).",
    "counter",
    ("deployment",),
    unit="short",
    group="kv",
)
MTP_DRAFT_BY_POSITION = MetricDef(
    "moeray_mtp_draft_tokens_per_position",
    "MTP draft tokens verified, by draft position in the step (0: the first draft).",
    "counter",
    ("deployment", "position"),
    unit="short",
    group="kv",
)
MTP_ACCEPTED_BY_POSITION = MetricDef(
    "moeray_mtp_accepted_tokens_per_position",
    "MTP draft tokens accepted, by draft position in the step (0: the first draft); with "
    "num_speculative_tokens > 1 the acceptance by position says how many drafts pay.",
    "counter",
    ("deployment", "position"),
    unit="short",
    group="kv",
)

# ---- router (RouterActor: training and serving) --------------------------------------------
# `gang` names the router's owner, so that routers of several gangs export apart: "train" (the
# training job's router) or "<role>-<replica id>" (an expert-parallel serving gang's: actors/ep.py).
EXPERT_LOAD = MetricDef(
    "moeray_expert_load",
    "Tokens routed to each routed expert in the last reporting window.",
    "gauge",
    ("gang", "layer", "expert"),
    unit="short",
    group="router",
)
ROUTER_MAXVIO = MetricDef(
    "moeray_router_maxvio",
    "MaxVio = max_i(load_i) / mean(load) - 1 per MoE layer over the last reporting window.",
    "gauge",
    ("gang", "layer"),
    unit="percentunit",
    group="router",
)
GPU_LOAD = MetricDef(
    "moeray_expert_gpu_load",
    "Rows (token, expert pairs) each expert-parallel serving rank (GPU) computed per MoE layer in "
    "the last reporting window.",
    "gauge",
    ("gang", "layer", "gpu"),
    unit="short",
    group="router",
)
PLACEMENT_MAXVIO = MetricDef(
    "moeray_placement_maxvio",
    "MaxVio over GPUs = max_g(load_g) / mean(load) - 1 per MoE layer of an EP serving gang.",
    "gauge",
    ("gang", "layer"),
    unit="percentunit",
    group="router",
)
PLACEMENT_CHANGES = MetricDef(
    "moeray_placement_changes",
    "Serving expert placements recomputed and sent to the ranks.",
    "counter",
    ("gang",),
    unit="short",
    group="router",
)

# ---- training ------------------------------------------------------------------------------
TRAIN_STEP = MetricDef(
    "moeray_train_step", "Last finished optimizer step.", "gauge", unit="short", group="training"
)
TRAIN_LOSS = MetricDef(
    "moeray_train_loss",
    "Main next-token cross-entropy of the last step.",
    "gauge",
    group="training",
)
TRAIN_MTP_LOSS = MetricDef(
    "moeray_train_mtp_loss",
    "MTP cross-entropy (before its lambda weight) of the last step.",
    "gauge",
    group="training",
)
TRAIN_TOKENS_PER_S = MetricDef(
    "moeray_train_tokens_per_s",
    "Training throughput of the last step in tokens per second.",
    "gauge",
    unit="short",
    group="training",
)
TRAIN_MAXVIO = MetricDef(
    "moeray_train_maxvio",
    "MaxVio of the last step's global batch, averaged over MoE layers.",
    "gauge",
    unit="percentunit",
    group="training",
)
TRAIN_LR = MetricDef(
    "moeray_train_learning_rate", "Learning rate of the last step.", "gauge", group="training"
)

METRICS: tuple[MetricDef, ...] = (
    TTFT, TPOT, ITL, E2E, REQUESTS, PROMPT_TOKENS, GENERATION_TOKENS,
    RUNNING, WAITING, KV_USED, KV_FREE, KV_TRANSFER_BYTES, KV_TRANSFER_SECONDS, MTP_DRAFT,
    MTP_ACCEPTED, MTP_DRAFT_BY_POSITION, MTP_ACCEPTED_BY_POSITION,
    EXPERT_LOAD, ROUTER_MAXVIO, GPU_LOAD, PLACEMENT_MAXVIO, PLACEMENT_CHANGES,
    TRAIN_STEP, TRAIN_LOSS, TRAIN_MTP_LOSS, TRAIN_TOKENS_PER_S, TRAIN_MAXVIO, TRAIN_LR,
)  # fmt: skip
GROUPS: tuple[str, ...] = ("serving", "kv", "router", "training")


def metric(name: str) -> MetricDef:
    """The definition named `name` (ValueError listing the known names otherwise)."""
    for d in METRICS:
        if d.name == name:
            return d
    raise ValueError(f"unknown metric {name!r}; known: {', '.join(d.name for d in METRICS)}")


def check_registry(defs: tuple[MetricDef, ...] = METRICS) -> None:
    """Names unique (also after export), groups known."""
    seen: set[str] = set()
    for d in defs:
        for s in d.series("prometheus"):
            if s in seen:
                raise ValueError(f"series {s!r} produced by more than one metric")
            seen.add(s)
        if d.group not in GROUPS:
            raise ValueError(f"metric {d.name}: group {d.group!r}; accepted: {GROUPS}")


@dataclass
class Metrics:
    """Records the metrics in `defs` through one runtime, creating each backend object lazily.

    `default_labels` fill labels a metric declares but a call leaves out (e.g. a replica sets
    `deployment` and `replica` once). Every call must end up with exactly the metric's labels:
    a missing or unknown label raises ValueError instead of silently creating a new series.
    One instance per process/actor; `registry` (prometheus runtime only) defaults to
    prometheus_client's global REGISTRY, which `start_http_server` serves.
    """

    runtime: Runtime
    defs: tuple[MetricDef, ...] = METRICS
    default_labels: dict[str, str] = field(default_factory=dict)
    registry: Any = None
    _objects: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    _by_name: dict[str, MetricDef] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime {self.runtime!r}; accepted: {RUNTIMES}")
        if self.registry is not None and self.runtime != "prometheus":
            raise ValueError("registry is only used by the prometheus runtime")
        check_registry(self.defs)
        self._by_name.update({d.name: d for d in self.defs})

    # -- recording ---------------------------------------------------------------------------
    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        d = self._def(name, "counter")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"counter {name}: increment {value!r} must be finite and >= 0")
        if value == 0:  # Ray rejects inc(0); a zero increment changes nothing anyway
            return
        self._record(d, value, labels)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._record(self._def(name, "gauge"), value, labels)

    def observe(self, name: str, value: float, **labels: str) -> None:
        d = self._def(name, "histogram")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"histogram {name}: observation {value!r} must be finite and >= 0")
        self._record(d, value, labels)

    def object(self, name: str) -> Any:
        """The backend object (ray.util.metrics.* or prometheus_client.*) for `name`."""
        d = self._by_name.get(name)
        if d is None:
            raise ValueError(f"metric {name!r} is not in this Metrics' definitions")
        obj = self._objects.get(name)
        if obj is None:
            obj = self._create(d)
            self._objects[name] = obj
        return obj

    def create_all(self) -> None:
        """Create every backend object now, so each metric is exported before its first sample."""
        for d in self.defs:
            self.object(d.name)

    # -- internals ---------------------------------------------------------------------------
    def _def(self, name: str, kind: str) -> MetricDef:
        d = self._by_name.get(name)
        if d is None:
            raise ValueError(f"metric {name!r} is not in this Metrics' definitions")
        if d.kind != kind:
            raise ValueError(f"metric {name} is a {d.kind}, not a {kind}")
        return d

    def _labels(self, d: MetricDef, labels: dict[str, str]) -> dict[str, str]:
        merged = {k: v for k, v in self.default_labels.items() if k in d.labels}
        merged.update(labels)
        if set(merged) != set(d.labels):
            raise ValueError(
                f"metric {d.name} takes labels {d.labels}; got {tuple(sorted(merged))} "
                f"(defaults {tuple(sorted(self.default_labels))})"
            )
        return {k: str(v) for k, v in merged.items()}

    def _record(self, d: MetricDef, value: float, labels: dict[str, str]) -> None:
        tags = self._labels(d, labels)
        obj = self.object(d.name)
        value = float(value)
        if self.runtime == "ray":
            if d.kind == "counter":
                obj.inc(value, tags=tags)
            elif d.kind == "gauge":
                obj.set(value, tags=tags)
            else:
                obj.observe(value, tags=tags)
            return
        target = obj.labels(**tags) if d.labels else obj
        if d.kind == "counter":
            target.inc(value)
        elif d.kind == "gauge":
            target.set(value)
        else:
            target.observe(value)

    def _create(self, d: MetricDef) -> Any:
        if self.runtime == "ray":
            from ray.util import metrics as rm

            if d.kind == "counter":
                return rm.Counter(d.name, description=d.help, tag_keys=d.labels)
            if d.kind == "gauge":
                return rm.Gauge(d.name, description=d.help, tag_keys=d.labels)
            return rm.Histogram(
                d.name, description=d.help, boundaries=list(d.buckets), tag_keys=d.labels
            )
        import prometheus_client as pc

        kw: dict[str, Any] = {"labelnames": d.labels}
        if self.registry is not None:
            kw["registry"] = self.registry
        if d.kind == "counter":
            return pc.Counter(d.name, d.help, **kw)
        if d.kind == "gauge":
            return pc.Gauge(d.name, d.help, **kw)
        return pc.Histogram(d.name, d.help, buckets=d.buckets, **kw)
