"""`moeray k8s render`: write the KubeRay manifests in k8s/ from the train and serve configs.

    moeray k8s render --train-config configs/train/tiny.yaml \
        --serve-config configs/serve/k8s.yaml --out k8s/
    moeray k8s render ... --check      # exit 1 when k8s/ differs from a fresh render
    moeray k8s render ... --train-storage s3://bucket/runs   # an object store, not a volume
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from moeray.platform.k8s.monitoring import monitors, network_policy
from moeray.platform.k8s.render import (
    RUNS_MOUNT,
    grafana_configmaps,
    raycluster,
    rayjob,
    rayservice,
)
from moeray.platform.plan.gpus import GPUS
from moeray.platform.train.job import load_config

VERSION_TAG = "0.1.0"
HEADER = (
    "# Rendered by `moeray k8s render` (moeray/platform/k8s/) from {source}; do not edit:\n"
    "# change the config and run `make k8s`.\n"
)


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (serveConfigV2, prometheus.yml); no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def _dump(docs: list[dict[str, Any]], source: str) -> str:
    body = "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=100) for d in docs)
    return HEADER.format(source=source) + body


def render_all(
    train_config: str,
    serve_config: str,
    *,
    tag: str = VERSION_TAG,
    gpus_per_node: int = 8,
    gpu: str | None = None,
    train_storage: str = RUNS_MOUNT,
) -> dict[str, str]:
    """File name -> text of every manifest."""
    job = load_config(train_config)
    serve = yaml.safe_load(Path(serve_config).read_text())
    if not isinstance(serve, dict):
        raise ValueError(f"{serve_config} must hold a mapping (a Serve config file or its args)")
    return {
        "rayjob-train.yaml": _dump(
            rayjob(
                job,
                train_config,
                tag=tag,
                gpus_per_node=gpus_per_node,
                gpu=gpu,
                storage=train_storage,
            ),
            train_config,
        ),
        "rayservice.yaml": _dump(
            rayservice(serve, tag=tag, gpus_per_node=gpus_per_node, gpu=gpu), serve_config
        ),
        "raycluster.yaml": _dump(raycluster(tag=tag, gpus_per_node=gpus_per_node), "defaults"),
        "monitoring.yaml": _dump(monitors(), "moeray/platform/k8s/monitoring.py"),
        "networkpolicy.yaml": _dump(network_policy(), "moeray/platform/k8s/monitoring.py"),
        "grafana.yaml": _dump(grafana_configmaps(), "moeray/platform/dashboards.py"),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="moeray k8s", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="write the manifests")
    r.add_argument("--train-config", required=True, help="train YAML (repository-relative)")
    r.add_argument("--serve-config", required=True, help="Serve config file or its args")
    r.add_argument("--out", default="k8s", help="output directory (default k8s/)")
    r.add_argument("--tag", default=VERSION_TAG, help="image tag (moeray:TAG-gpu/-cpu)")
    r.add_argument("--gpus-per-node", type=int, default=8)
    r.add_argument(
        "--gpu",
        choices=sorted(GPUS),
        help="the nodes' GPU: set as MOERAY_GPU in the pods, so that `moeray train`/`serve` on "
        "a GPU-less head check memory against it",
    )
    r.add_argument(
        "--train-storage",
        default=RUNS_MOUNT,
        help="the training run's storage: the mount path of the shared volume on every pod "
        f"(default {RUNS_MOUNT}) or an object-store URI (s3://bucket/prefix, no volume)",
    )
    r.add_argument("--check", action="store_true", help="only report files that differ")
    a = p.parse_args(argv)
    try:
        files = render_all(
            a.train_config,
            a.serve_config,
            tag=a.tag,
            gpus_per_node=a.gpus_per_node,
            gpu=a.gpu,
            train_storage=a.train_storage,
        )
    except (ValueError, OSError) as e:
        print(f"moeray k8s: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    stale = [n for n, t in files.items() if not (out / n).exists() or (out / n).read_text() != t]
    if a.check:
        for n in stale:
            print(f"moeray k8s: {out / n} differs from a fresh render", file=sys.stderr)
        return 1 if stale else 0
    out.mkdir(parents=True, exist_ok=True)
    for n, t in files.items():
        (out / n).write_text(t)
    print(f"moeray k8s: wrote {', '.join(sorted(files))} to {out}/")
    return 0
