"""KubeRay manifests in k8s/: validated offline against the vendored KubeRay v1.7.0 CRDs
(k8s/crds/), strictly (unknown fields are errors, as with `kubectl apply --validate=strict`),
plus the facts the manifests promise: the dashboard is never exposed, the training RayJob runs
configs/train/tiny.yaml on as many worker slots as its parallel layout needs, and the RayService's
Serve config parses into ServeConfig."""

from __future__ import annotations

import copy
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
DASHBOARD_PORTS = {8265, 52365}


@cache
def crd_schema(kind: str) -> dict:
    # libyaml when available: the three CRDs are 3.3 MB, ~5 s each with the pure-Python loader
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((K8S / "crds" / CRD_FILES[kind]).read_text(), Loader=loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def load_all() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for d in load_all() if d["kind"] == kind]


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Keys the structural schema does not define (the API server would prune them silently)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in obj.items():
            if props is not None and k in props:
                out += unknown_fields(v, props[k], f"{path}.{k}")
            elif isinstance(extra, dict):
                out += unknown_fields(v, extra, f"{path}.{k}")
            elif props is not None or extra is False:
                out.append(f"{path}.{k}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(obj):
            out += unknown_fields(v, schema["items"], f"{path}[{i}]")
    return out


def validate(doc: dict) -> None:
    import jsonschema

    schema = crd_schema(doc["kind"])
    jsonschema.Draft7Validator(schema).validate(doc)
    bad = unknown_fields({k: v for k, v in doc.items() if k != "metadata"}, schema)
    assert not bad, f"{doc['kind']} {doc['metadata']['name']}: unknown fields {bad}"


def cluster_specs() -> list[tuple[str, dict]]:
    out = [(f"RayCluster/{d['metadata']['name']}", d["spec"]) for d in by_kind("RayCluster")]
    out += [
        (f"RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in by_kind("RayJob")
    ]
    out += [
        (f"RayService/{d['metadata']['name']}", d["spec"]["rayClusterConfig"])
        for d in by_kind("RayService")
    ]
    return out


def test_crds_are_vendored_with_their_license():
    assert "Apache License" in (K8S / "crds" / "LICENSE").read_text()
    for kind in CRD_FILES:
        assert crd_schema(kind)["properties"]["spec"]["type"] == "object"
    assert {d["kind"] for d in load_all()} >= {"RayCluster", "RayJob", "RayService", "PodMonitor"}


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_manifests_validate_against_the_crds(kind):
    docs = by_kind(kind)
    assert docs, f"no {kind} in k8s/"
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1"
        validate(doc)


def test_validation_can_fail():
    import jsonschema

    (job,) = by_kind("RayJob")
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["port"] = 1
    with pytest.raises(AssertionError, match="unknown fields"):
        validate(bad)
    bad = copy.deepcopy(job)
    del bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)


def test_dashboard_is_never_exposed():
    for name, spec in cluster_specs():
        head = spec["headGroupSpec"]
        ports = {
            p["containerPort"]
            for c in head["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        if name.startswith("RayService"):
            # the operator must reach it in-cluster; the network policy admits only the operator
            assert head.get("serviceType", "ClusterIP") == "ClusterIP", name
        else:
            assert head["rayStartParams"].get("dashboard-host") == "127.0.0.1", name
            assert not ports & DASHBOARD_PORTS, f"{name} declares a dashboard port"
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", name
        assert head["rayStartParams"].get("metrics-export-port") == "8080", name
    for doc in load_all():
        assert doc["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), doc["kind"]
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
            assert not {p["port"] for p in doc["spec"]["ports"]} & DASHBOARD_PORTS
    (policy,) = by_kind("NetworkPolicy")
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if ports & DASHBOARD_PORTS:
            (src,) = rule["from"]
            assert src["namespaceSelector"]["matchLabels"] == {
                "kubernetes.io/metadata.name": "kuberay-system"
            }
    labels = policy["spec"]["podSelector"]["matchLabels"]
    for name, spec in cluster_specs():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for g in groups:
            assert labels.items() <= g["template"]["metadata"]["labels"].items(), name


def test_training_job_matches_the_train_config():
    (job,) = by_kind("RayJob")
    assert job["spec"]["entrypoint"] == "moeray train --config configs/train/tiny.yaml"
    assert job["spec"]["submissionMode"] == "SidecarMode"
    assert (
        job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["restartPolicy"]
        == "Never"
    )
    cfg = yaml.safe_load((REPO / "configs/train/tiny.yaml").read_text())
    par = cfg["parallel"]
    world = par["pp"] * par["ep"] * par["dp"]
    slots = 0
    for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        cpus = int(g["rayStartParams"]["num-cpus"])
        (c,) = g["template"]["spec"]["containers"]
        assert int(c["resources"]["limits"]["cpu"]) >= cpus
        slots += g["replicas"] * cpus
    assert slots == world  # one CPU per Ray Train worker (train/job.py: resources_per_worker)
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayservice_serve_config_parses_into_serve_config():
    from moeray.platform.config import ServeConfig

    (svc,) = by_kind("RayService")
    serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "moeray.platform.serve.app:build"
    cfg = ServeConfig.from_dict(app["args"])
    assert "api_key" not in app["args"]  # the key comes from a Secret, never from the manifest
    gpus = sum(
        int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * g["replicas"]
        for g in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    )
    need = cfg.gpus_per_replica * (
        cfg.prefill_replicas + cfg.decode_replicas if cfg.mode == "pd" else cfg.decode_replicas
    )
    assert need <= gpus, (need, gpus)
    assert serve["http_options"]["port"] == 8000
    for _, spec in cluster_specs():
        for c in spec["headGroupSpec"]["template"]["spec"]["containers"]:
            for env in c.get("env", []):
                if env["name"] == "MOERAY_API_KEY":
                    assert "value" not in env and env["valueFrom"]["secretKeyRef"]


def test_monitoring_scrapes_the_metrics_port(tmp_path):
    (pm,) = by_kind("PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] == "metrics"
    for name, spec in cluster_specs():
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert (
                pm["spec"]["selector"]["matchLabels"].items()
                <= g["template"]["metadata"]["labels"].items()
            )
            ports = {
                p["name"]: p["containerPort"]
                for c in g["template"]["spec"]["containers"]
                for p in c.get("ports", [])
            }
            assert ports.get("metrics") == 8080, name
    (cm,) = by_kind("ConfigMap")
    prom = cm["data"]["prometheus.yml"]
    assert yaml.safe_load(prom)["scrape_configs"][0]["kubernetes_sd_configs"] == [{"role": "pod"}]
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    # Debian builds Prometheus without Kubernetes service discovery; check everything else
    # (relabel rules, intervals) with the discovery swapped for a static target.
    conf = yaml.safe_load(prom)
    probe = subprocess.run(
        ["promtool", "check", "config", "/dev/stdin"],
        input=prom,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if "kubernetes_sd_configs not found" in probe.stdout + probe.stderr:
        for job in conf["scrape_configs"]:
            job["static_configs"] = [{"targets": ["127.0.0.1:8080"]}]
            del job["kubernetes_sd_configs"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(conf))
    r = subprocess.run(
        ["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stdout + r.stderr
