"""Scraping and network policy for the Ray pods the manifests create.

Every pod exports Ray's and moeray's metrics on port 8080 (`metrics`). Worker pods are scraped
through a PodMonitor, head pods through a ServiceMonitor on KubeRay's head service (which carries
the head's declared ports), so no pod is scraped twice; a plain Prometheus scrape config is the
alternative without the Prometheus Operator. The NetworkPolicy keeps the Ray dashboard (8265) and
its agent (52365) to the KubeRay operator's namespace.
"""

from __future__ import annotations

from typing import Any

import yaml

from moeray.platform.k8s.render import LABELS, METRICS_PORT, SERVE_PORT

RELABEL = [
    ("__meta_kubernetes_pod_label_ray_io_cluster", "ray_io_cluster"),
    ("__meta_kubernetes_pod_label_ray_io_node_type", "ray_io_node_type"),
]


def monitors() -> list[dict[str, Any]]:
    endpoint = {
        "port": "metrics",
        "path": "/metrics",
        "interval": "15s",
        "relabelings": [{"sourceLabels": [s], "targetLabel": t} for s, t in RELABEL],
    }
    # kube-prometheus-stack selects monitors by its release label (the Helm release name)
    meta = {"labels": {**LABELS, "release": "prometheus"}}
    return [
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": {"name": "moeray-ray-workers", **meta},
            "spec": {
                "selector": {
                    "matchLabels": dict(LABELS),
                    "matchExpressions": [
                        {"key": "ray.io/node-type", "operator": "In", "values": ["worker"]}
                    ],
                },
                "podMetricsEndpoints": [endpoint],
            },
        },
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": {"name": "moeray-ray-head", **meta},
            "spec": {
                # KubeRay labels the head service it creates for every RayCluster
                "selector": {
                    "matchLabels": {
                        "app.kubernetes.io/created-by": "kuberay-operator",
                        "ray.io/node-type": "head",
                    }
                },
                "endpoints": [endpoint],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "moeray-prometheus-config", "labels": dict(LABELS)},
            "data": {"prometheus.yml": _prometheus_yml()},
        },
    ]


def _prometheus_yml() -> str:
    relabel: list[dict[str, Any]] = [
        {
            "source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name"],
            "regex": "moeray",
            "action": "keep",
        },
        {
            "source_labels": ["__meta_kubernetes_pod_container_port_name"],
            "regex": "metrics",
            "action": "keep",
        },
        *({"source_labels": [s], "target_label": t} for s, t in RELABEL),
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    ]
    conf = {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "scrape_configs": [
            {
                "job_name": "moeray-ray",
                "kubernetes_sd_configs": [{"role": "pod"}],
                "relabel_configs": relabel,
            }
        ],
    }
    return yaml.safe_dump(conf, sort_keys=False)


def network_policy() -> list[dict[str, Any]]:
    def ns(name: str) -> dict[str, Any]:
        return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}

    def tcp(*ports: int) -> list[dict[str, Any]]:
        return [{"protocol": "TCP", "port": p} for p in ports]

    return [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "moeray-ray-pods", "labels": dict(LABELS)},
            "spec": {
                "podSelector": {"matchLabels": dict(LABELS)},
                "policyTypes": ["Ingress"],
                "ingress": [
                    # Ray pods among themselves: GCS, raylets, object transfer and NCCL use many
                    # dynamic ports
                    {"from": [{"podSelector": {"matchLabels": dict(LABELS)}}]},
                    {"from": [ns("kuberay-system")], "ports": tcp(8265, 52365)},
                    {"from": [{"podSelector": {}}], "ports": tcp(SERVE_PORT)},
                    {"from": [ns("monitoring")], "ports": tcp(METRICS_PORT)},
                ],
            },
        }
    ]
