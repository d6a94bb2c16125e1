"""KubeRay manifests in k8s/, rendered by `moeray k8s render` from the train and serve configs:
the committed files equal a fresh render; validated offline against the vendored KubeRay v1.7.0
CRDs (k8s/crds/), strictly (unknown fields are errors, as with `kubectl apply --validate=strict`),
and against the Kubernetes core schemas (kubernetes-validate: ConfigMaps, volume claims, network
policy, and every pod template as a Pod); plus the facts the manifests promise: the dashboard is
never exposed, the training RayJob runs its config on exactly the worker slots (and GPUs) its
parallel layout needs with shared run storage, the RayService's Serve config parses into
ServeConfig and its import path imports, and its worker groups hold exactly the GPUs the replicas
request."""

from __future__ import annotations

import copy
import importlib
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


def rendered_docs(train: str, serve: str) -> list[dict]:
    from moeray.platform.k8s import render_all

    return [d for text in render_all(train, serve).values() for d in yaml.safe_load_all(text) if d]


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
    entry = "moeray train --config configs/train/tiny.yaml --storage /runs"
    assert job["spec"]["entrypoint"] == entry
    # shared run storage: one ReadWriteMany claim mounted at /runs on the head and every worker
    (claim,) = [
        c for c in by_kind("PersistentVolumeClaim") if c["metadata"]["name"] == "moeray-runs"
    ]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    spec = job["spec"]["rayClusterSpec"]
    for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        (c,) = g["template"]["spec"]["containers"]
        assert {"name": "runs", "mountPath": "/runs"} in c["volumeMounts"]
        vols = {v["name"]: v for v in g["template"]["spec"]["volumes"]}
        assert vols["runs"]["persistentVolumeClaim"]["claimName"] == "moeray-runs"
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


def test_training_job_storage_is_a_volume_or_an_object_store():
    from moeray.platform.k8s.render import rayjob
    from moeray.platform.train.job import load_config

    job = load_config(TRAIN)

    def parts(docs):
        (rj,) = [d for d in docs if d["kind"] == "RayJob"]
        spec = rj["spec"]["rayClusterSpec"]
        pods = [g["template"]["spec"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]
        return rj, pods

    # an object store: the URI reaches `moeray train`, no volume, credentials from a Secret
    docs = rayjob(job, TRAIN, tag="t", storage="s3://bucket/runs?region=us-east-1")
    rj, pods = parts(docs)
    validate(rj)
    assert rj["spec"]["entrypoint"].endswith("--storage s3://bucket/runs?region=us-east-1")
    assert [d["kind"] for d in docs] == ["RayJob"]
    for pod in pods:
        (c,) = pod["containers"]
        assert "volumes" not in pod and "volumeMounts" not in c
        assert c["envFrom"] == [{"secretRef": {"name": "moeray-storage", "optional": True}}]
    # another mount path (also as a file:// URI): the shared volume is mounted there
    for storage in ("/mnt/nfs", "file:///mnt/nfs"):
        rj, pods = parts(rayjob(job, TRAIN, tag="t", storage=storage))
        assert rj["spec"]["entrypoint"].endswith(f"--storage {storage}")
        for pod in pods:
            assert {"name": "runs", "mountPath": "/mnt/nfs"} in pod["containers"][0]["volumeMounts"]
    with pytest.raises(ValueError, match=r"unsupported URI scheme 'ftp'.*s3"):
        rayjob(job, TRAIN, tag="t", storage="ftp://host/runs")
    with pytest.raises(ValueError, match="'runs' must be an absolute path"):
        rayjob(job, TRAIN, tag="t", storage="runs")


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
    ep = cfg.ep or 1  # None: one process per replica
    need = (
        ep
        * cfg.gpus_per_replica
        * (cfg.prefill_replicas + cfg.decode_replicas if cfg.mode == "pd" else cfg.decode_replicas)
    )
    assert need == gpus, (need, gpus)
    groups = {g["groupName"] for g in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert groups == {"prefill", "decode"}
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert serve["http_options"]["port"] == 8000
    for _, spec in cluster_specs():
        for c in spec["headGroupSpec"]["template"]["spec"]["containers"]:
            for env in c.get("env", []):
                if env["name"] == "MOERAY_API_KEY":
                    assert "value" not in env and env["valueFrom"]["secretKeyRef"]


def test_monitoring_scrapes_the_metrics_port(tmp_path):
    (pm,) = by_kind("PodMonitor")
    (sm,) = by_kind("ServiceMonitor")
    assert pm["apiVersion"] == sm["apiVersion"] == "monitoring.coreos.com/v1"
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] == "metrics" and sm["spec"]["endpoints"][0]["port"] == "metrics"
    # workers through the PodMonitor, heads through the ServiceMonitor: none scraped twice
    (expr,) = pm["spec"]["selector"]["matchExpressions"]
    assert expr == {"key": "ray.io/node-type", "operator": "In", "values": ["worker"]}
    assert sm["spec"]["selector"]["matchLabels"]["ray.io/node-type"] == "head"
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
    (cm,) = [c for c in by_kind("ConfigMap") if "prometheus.yml" in c["data"]]
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


def test_committed_manifests_equal_a_fresh_render(tmp_path):
    from moeray import cli
    from moeray.platform import k8s

    args = ["render", "--train-config", TRAIN, "--serve-config", SERVE, "--out", str(K8S)]
    assert cli.main(["k8s", *args, "--check"]) == 0, "k8s/ is stale: run `make k8s`"
    stale = tmp_path / "k8s"
    shutil.copytree(K8S, stale)
    (stale / "rayservice.yaml").write_text("# edited by hand\n")
    args[-1] = str(stale)
    assert k8s.main([*args, "--check"]) == 1
    assert k8s.main(args) == 0 and k8s.main([*args, "--check"]) == 0


TRAIN, SERVE = "configs/train/tiny.yaml", "configs/serve/k8s.yaml"


def core_resources(docs: list[dict]) -> list[dict]:
    """Core-API documents, plus every Ray pod template as a Pod (the CRDs leave the pod spec
    to the core schema: KubeRay's CRD marks it x-kubernetes-preserve-unknown-fields in parts)."""
    out = [d for d in docs if not d["apiVersion"].endswith((".ray.io/v1", "ray.io/v1"))]
    out = [d for d in out if not d["apiVersion"].startswith("monitoring.coreos.com")]
    for d in docs:
        if d["apiVersion"] != "ray.io/v1":
            continue
        spec = d["spec"].get("rayClusterSpec") or d["spec"].get("rayClusterConfig") or d["spec"]
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            t = g["template"]
            out.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "p", **t["metadata"]},
                    "spec": t["spec"],
                }
            )
    return out


@pytest.mark.parametrize(
    "train", ["configs/train/tiny.yaml", "configs/train/small-pp2-ep2-gpu.yaml"]
)
def test_rendered_manifests_validate_against_core_and_crd_schemas(train):
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.utils.latest_version()  # the newest Kubernetes the validator bundles
    docs = rendered_docs(train, SERVE)
    for doc in docs:
        if doc["apiVersion"] == "ray.io/v1":
            validate(doc)
    core = core_resources(docs)
    assert {d["kind"] for d in core} >= {
        "ConfigMap",
        "PersistentVolumeClaim",
        "NetworkPolicy",
        "Pod",
    }
    for doc in core:
        kv.validate(doc, version, strict=True)
    bad = copy.deepcopy(next(d for d in core if d["kind"] == "Pod"))
    bad["spec"]["containers"][0]["resources"]["limits"]["cpu"] = []
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, version, strict=True)


def test_gpu_rayjob_requests_the_layouts_gpus():
    from moeray.platform.train.job import load_config

    train = "configs/train/small-pp2-ep2-gpu.yaml"
    (job,) = [d for d in rendered_docs(train, SERVE) if d["kind"] == "RayJob"]
    world = load_config(train).parallel.world
    gpus = sum(
        int(c["resources"]["limits"]["nvidia.com/gpu"]) * g["replicas"]
        for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    )
    assert gpus == world == 4


def test_rayservice_groups_follow_ep_and_replicas(tmp_path):
    from moeray.platform.k8s.render import rayservice

    args = yaml.safe_load((REPO / SERVE).read_text())["applications"][0]["args"]
    (svc, _) = rayservice({**args, "prefill_replicas": 1, "decode_replicas": 3}, tag="t")
    groups = {g["groupName"]: g for g in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}

    def gpu(g: dict) -> int:
        return int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])

    assert gpu(groups["prefill"]) * groups["prefill"]["replicas"] == 1
    assert gpu(groups["decode"]) * groups["decode"]["replicas"] == 3
    (svc, _) = rayservice({**args, "decode_replicas": 16}, tag="t")
    groups = {g["groupName"]: g for g in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    dec = groups["decode"]
    assert dec["replicas"] == 2 and gpu(dec) == 8  # two 8-GPU pods
    with pytest.raises(ValueError, match="do not pack into pods of 8"):
        rayservice({**args, "decode_replicas": 12}, tag="t")
    with pytest.raises(ValueError, match="api_key"):
        rayservice({**args, "api_key": "secret"}, tag="t")


def test_serve_gpus_count_ep_and_gpu_env_reaches_the_pods():
    from types import SimpleNamespace

    from moeray.platform.k8s.render import serve_gpus

    cfg = SimpleNamespace(
        ep=8,
        mode="pd",
        prefill_replicas=1,
        decode_replicas=2,
        gpus_per_replica=1.0,
        autoscaling=None,
    )
    assert serve_gpus(cfg) == {"decode": 16.0, "prefill": 8.0}
    cfg.mode = "colocated"
    assert serve_gpus(cfg) == {"decode": 16.0}
    from moeray.platform.k8s import render_all

    files = render_all("configs/train/small-pp2-ep2-gpu.yaml", SERVE, gpu="h200")
    (job, _) = yaml.safe_load_all(files["rayjob-train.yaml"])
    (head,) = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert {"name": "MOERAY_GPU", "value": "h200"} in head["env"]


@pytest.mark.parametrize("flavor", ["gpu", "cpu"], ids=["cuda-image", "cpu-image"])
def test_dockerfiles_build_what_the_manifests_name(flavor):
    import re
    import tomllib

    from moeray.platform.k8s import VERSION_TAG
    from moeray.platform.k8s.render import images

    text = (K8S / f"Dockerfile.{flavor}").read_text()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(d for d in deps if d.startswith("torch=="))
    assert f"pip install {torch_pin} --index-url" in text  # the CUDA or CPU wheel, same version
    assert "ray[serve,train]==2.58.0" in deps  # what `pip install .` brings
    for src in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for path in src.split():
            assert (REPO / path).exists(), path
    assert "WORKDIR /app" in text  # the manifests' workingDir
    image = images(VERSION_TAG)[flavor]
    assert f"-t {image} ." in text
    named = {
        c["image"]
        for _, spec in cluster_specs()
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for c in g["template"]["spec"]["containers"]
    }
    assert named <= set(images(VERSION_TAG).values())
