"""Grafana dashboards generated from `moeray.platform.metrics`, and `moeray dashboards`.

    moeray dashboards generate [--out dashboards] [--check]
    moeray dashboards push --url http://grafana:3000 --api-key KEY [--folder moeray]

One dashboard per area: serving (request latency, throughput, batch, KV cache, MTP), router
(expert load and MaxVio per layer) and training. Every metric definition becomes a panel whose
PromQL uses the *exported* series name (`ray_` prefix, `_total` on counters: see metrics.py), so
renaming a metric renames its panels. Training metrics may be recorded inside Ray (Ray Train
workers) or by prometheus_client, so their panels query both names with PromQL `or`.
Besides the JSON, `generate` writes Grafana provisioning files (a Prometheus datasource and a
dashboard provider that loads the JSON from /var/lib/grafana/dashboards/moeray).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from moeray.platform.metrics import METRICS, MetricDef

DASHBOARD_DIR = Path("dashboards")
FOLDER_UID = "moeray"
DS = {"type": "prometheus", "uid": "${datasource}"}
QUANTILES = (0.5, 0.9, 0.99)
RATE = "$__rate_interval"
# dashboard uid -> (title, metric groups)
DASHBOARDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "moeray-serving": ("moeray: serving", ("serving", "kv")),
    "moeray-router": ("moeray: expert routing", ("router",)),
    "moeray-training": ("moeray: training", ("training",)),
}
# Labels that become dashboard variables (filtered with =~, not split into series).
VARIABLE_LABELS = ("model", "gang", "layer")
PANEL_W, PANEL_H = 12, 8


# ---- PromQL -------------------------------------------------------------------------------------
def _selector(d: MetricDef, series: str) -> str:
    filters = [f'{lab}=~"${lab}"' for lab in d.labels if lab in VARIABLE_LABELS]
    return series + ("{" + ",".join(filters) + "}" if filters else "")


def _by(d: MetricDef, extra: tuple[str, ...] = ()) -> str:
    """Aggregation labels: the metric's own labels, without `replica` (summed over replicas)
    and `model` (a variable), plus `extra` (e.g. `le`)."""
    keep = [x for x in extra] + [lab for lab in d.labels if lab not in ("replica", "model")]
    return f" by ({', '.join(keep)})" if keep else ""


def _legend(d: MetricDef, prefix: str = "") -> str:
    labels = [lab for lab in d.labels if lab not in ("replica", "model")]
    text = " ".join("{{" + lab + "}}" for lab in labels)
    return (prefix + " " + text).strip() or d.name.removeprefix("moeray_")


def queries(d: MetricDef) -> list[tuple[str, str]]:
    """(PromQL, legend) pairs for one metric's panel."""
    if d.kind == "histogram":
        bucket = _selector(d, d.series("ray")[0])
        return [
            (
                f"histogram_quantile({q}, sum{_by(d, ('le',))} (rate({bucket}[{RATE}])))",
                _legend(d, f"p{round(q * 100)}"),
            )
            for q in QUANTILES
        ]
    if d.kind == "counter":
        return [(f"sum{_by(d)} (rate({_selector(d, d.exported_name('ray'))}[{RATE}]))", _legend(d))]
    agg = "max" if d.group == "training" or d.unit == "percentunit" else "sum"
    expr = f"{agg}{_by(d)} ({_selector(d, d.exported_name('ray'))})"
    if d.group == "training":  # recorded in a Ray worker, or by prometheus_client outside Ray
        expr += f" or {agg}{_by(d)} ({_selector(d, d.exported_name('prometheus'))})"
    return [(expr, _legend(d))]


_ACRONYMS = {
    "ttft": "TTFT",
    "tpot": "TPOT",
    "kv": "KV",
    "mtp": "MTP",
    "e2e": "E2E",
    "maxvio": "MaxVio",
    "lr": "LR",
    "gpu": "GPU",
}


def _title(d: MetricDef) -> str:
    words = [_ACRONYMS.get(w, w) for w in d.name.removeprefix("moeray_").split("_")]
    if words[-1] == "seconds":
        words = words[:-1]
    name = " ".join(words)
    suffix = {"histogram": " (p50/p90/p99)", "counter": " /s"}.get(d.kind, "")
    return name[0].upper() + name[1:] + suffix


def _panel_unit(d: MetricDef) -> str:
    if d.kind == "counter":
        return {"bytes": "Bps"}.get(d.unit, "ops" if d.unit == "short" else d.unit)
    return d.unit


def _derived(group: str) -> list[tuple[str, str, list[tuple[str, str]], str]]:
    """Panels that combine metrics: (title, description, [(expr, legend)], unit)."""
    by_name = {d.name: d for d in METRICS}

    def s(name: str) -> str:
        return by_name[name].exported_name("ray")

    if group == "kv":
        used, free = s("moeray_kv_pages_used"), s("moeray_kv_pages_free")
        acc, draft = s("moeray_mtp_accepted_tokens"), s("moeray_mtp_draft_tokens")
        acc_j = s("moeray_mtp_accepted_tokens_per_position")
        draft_j = s("moeray_mtp_draft_tokens_per_position")
        return [
            (
                "KV cache utilization",
                "used / (used + free) pages per deployment",
                [
                    (
                        f"sum by (deployment) ({used}) / (sum by (deployment) ({used}) + "
                        f"sum by (deployment) ({free}))",
                        "{{deployment}}",
                    )
                ],
                "percentunit",
            ),
            (
                "MTP acceptance rate",
                "accepted / drafted MTP tokens",
                [
                    (
                        f"sum by (deployment) (rate({acc}[{RATE}])) / "
                        f"sum by (deployment) (rate({draft}[{RATE}]))",
                        "{{deployment}}",
                    )
                ],
                "percentunit",
            ),
            (
                "MTP acceptance by draft position",
                "accepted / verified drafts at each position of a step (0: the first draft)",
                [
                    (
                        f"sum by (deployment, position) (rate({acc_j}[{RATE}])) / "
                        f"sum by (deployment, position) (rate({draft_j}[{RATE}]))",
                        "{{deployment}} draft {{position}}",
                    )
                ],
                "percentunit",
            ),
        ]
    if group == "serving":
        req = s("moeray_requests")
        return [
            (
                "Error and rejection ratio",
                "non-200 answers / all answers, by status",
                [
                    (
                        f'sum by (status) (rate({req}{{model=~"$model",status!="200"}}[{RATE}])) / '
                        f'scalar(sum(rate({req}{{model=~"$model"}}[{RATE}])))',
                        "{{status}}",
                    )
                ],
                "percentunit",
            ),
        ]
    return []


def _panel(
    pid: int, x: int, y: int, title: str, desc: str, targets: list[tuple[str, str]], unit: str
) -> dict[str, Any]:
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"h": PANEL_H, "w": PANEL_W, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DS,
                "expr": expr,
                "legendFormat": legend,
                "range": True,
            }
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def _variables(defs: list[MetricDef]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "refresh": 1,
            "regex": "",
            "options": [],
        }
    ]
    for lab in VARIABLE_LABELS:
        src = next((d for d in defs if lab in d.labels), None)
        if src is None:
            continue
        out.append(
            {
                "name": lab,
                "label": lab,
                "type": "query",
                "datasource": DS,
                "query": {"query": f"label_values({src.series('ray')[0]}, {lab})", "refId": lab},
                "definition": f"label_values({src.series('ray')[0]}, {lab})",
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
                "refresh": 2,
                "sort": 3,
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                "hide": 0,
                "options": [],
                "regex": "",
            }
        )
    return out


def build_dashboard(uid: str) -> dict[str, Any]:
    title, groups = DASHBOARDS[uid]
    defs = [d for d in METRICS if d.group in groups]
    panels: list[dict[str, Any]] = []
    y, pid = 0, 1
    for group in groups:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": group,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y = pid + 1, y + 1
        items = [(_title(d), d.help, queries(d), _panel_unit(d)) for d in defs if d.group == group]
        items += _derived(group)
        for i, (ptitle, desc, targets, unit) in enumerate(items):
            panels.append(
                _panel(pid, (i % 2) * PANEL_W, y + (i // 2) * PANEL_H, ptitle, desc, targets, unit)
            )
            pid += 1
        y += ((len(items) + 1) // 2) * PANEL_H
    return {
        "uid": uid,
        "title": title,
        "tags": ["moeray"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": _variables(defs)},
        "annotations": {"list": []},
        "panels": panels,
    }


def all_dashboards() -> dict[str, dict[str, Any]]:
    return {uid: build_dashboard(uid) for uid in DASHBOARDS}


def provisioning_files(prometheus_url: str = "http://prometheus:9090") -> dict[str, str]:
    """Grafana provisioning: the Prometheus datasource and the dashboard provider."""
    datasources = (
        "apiVersion: 1\n"
        "datasources:\n"
        "  - name: Prometheus\n"
        "    uid: prometheus\n"
        "    type: prometheus\n"
        "    access: proxy\n"
        f"    url: {prometheus_url}\n"
        "    isDefault: true\n"
    )
    providers = (
        "apiVersion: 1\n"
        "providers:\n"
        "  - name: moeray\n"
        f"    folder: {FOLDER_UID}\n"
        f"    folderUid: {FOLDER_UID}\n"
        "    type: file\n"
        "    disableDeletion: false\n"
        "    allowUiUpdates: false\n"
        "    options:\n"
        "      path: /var/lib/grafana/dashboards/moeray\n"
    )
    return {
        "provisioning/datasources/moeray.yaml": datasources,
        "provisioning/dashboards/moeray.yaml": providers,
    }


def rendered_files() -> dict[str, str]:
    """Every file `generate` writes, relative to the output directory."""
    files = {
        f"{uid}.json": json.dumps(d, indent=2, sort_keys=True) + "\n"
        for uid, d in all_dashboards().items()
    }
    files.update(provisioning_files())
    return files


def generate(out_dir: Path, check: bool = False) -> list[str]:
    """Write the files (or, with check, list those that differ from what would be written)."""
    stale = []
    for rel, text in rendered_files().items():
        path = Path(out_dir) / rel
        current = path.read_text() if path.exists() else None
        if current != text:
            stale.append(rel)
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    return stale


def push(
    url: str, api_key: str | None, folder: str = FOLDER_UID, timeout_s: float = 10.0
) -> list[str]:
    """Create the folder if missing and upload every dashboard (overwriting); return the uids."""
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError

    api = GrafanaApi.from_url(url, credential=api_key, timeout=timeout_s)
    try:
        api.folder.get_folder(folder)
    except GrafanaClientError as e:
        if e.status_code != 404:
            raise
        api.folder.create_folder(folder, uid=folder)
    uids = []
    for uid, dash in all_dashboards().items():
        api.dashboard.update_dashboard(
            {
                "dashboard": {**dash, "id": None},
                "folderUid": folder,
                "overwrite": True,
                "message": "moeray dashboards push",
            }
        )
        uids.append(uid)
    return uids


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="moeray dashboards", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write dashboards/*.json and provisioning files")
    g.add_argument("--out", default=str(DASHBOARD_DIR))
    g.add_argument("--check", action="store_true", help="exit 1 if the files are out of date")
    ps = sub.add_parser("push", help="upload the dashboards to Grafana")
    ps.add_argument("--url", required=True, help="Grafana base URL, e.g. http://grafana:3000")
    ps.add_argument("--api-key", default=None, help="service account token ($GRAFANA_API_KEY)")
    ps.add_argument("--folder", default=FOLDER_UID)
    args = p.parse_args(argv)
    if args.cmd == "generate":
        stale = generate(Path(args.out), check=args.check)
        verb = "out of date" if args.check else "wrote"
        for rel in stale:
            print(f"{verb}: {Path(args.out) / rel}")
        if not stale:
            print(f"{args.out}: up to date")
        return 1 if args.check and stale else 0
    key = args.api_key or os.environ.get("GRAFANA_API_KEY")
    for uid in push(args.url, key, args.folder):
        print(f"pushed {uid} to {args.url} (folder {args.folder})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
