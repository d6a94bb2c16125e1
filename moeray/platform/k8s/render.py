"""KubeRay manifests rendered from moeray's own configs, so no number is typed twice.

A train config (TrainJobConfig YAML) gives the RayJob: PP x EP x DP Ray Train workers, one CPU
each (and one GPU each under `use_gpu`, train/job.py's ScalingConfig), packed into worker pods of
at most `gpus_per_node` GPUs, with the run storage every pod reaches (train/storage.py): a shared
ReadWriteMany volume mounted on every pod at the storage path (default /runs), or an object-store
URI (s3://bucket/prefix, ...) with the credentials from the optional Secret `moeray-storage`.
Tokenized data, checkpoints, router state, history and the final model all live there.
A serve config (a Serve config file from `moeray serve --write-config`, or its `args`) gives the
RayService: a prefill and a decode worker group, each with the GPUs its replicas request
(replicas x `ep` x `gpus_per_replica`), serveConfigV2 equal to the file with the cluster's host.
Both set every pod's `metrics` port (8080) that the PodMonitor/ServiceMonitor scrape, keep the
Ray dashboard off any exposed port, and take the API key from a Secret.
"""

from __future__ import annotations

import json
import math
from typing import Any
from urllib.parse import urlparse

import yaml

from moeray.platform import dashboards
from moeray.platform.config import ServeConfig
from moeray.platform.train.storage import uri_scheme

RAY_VERSION = "2.58.0"
LABELS = {"app.kubernetes.io/name": "moeray"}
METRICS_PORT = 8080
SERVE_PORT = 8000
RUNS_MOUNT = "/runs"  # the RayJob's shared storage: `moeray train --storage /runs`
MODELS_MOUNT = "/models"
API_KEY_ENV = {
    "name": "MOERAY_API_KEY",
    "valueFrom": {"secretKeyRef": {"name": "moeray-api-key", "key": "api-key", "optional": True}},
}
DSHM = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}


def images(tag: str) -> dict[str, str]:
    """The two images k8s/Dockerfile.gpu and k8s/Dockerfile.cpu build."""
    return {"gpu": f"moeray:{tag}-gpu", "cpu": f"moeray:{tag}-cpu"}


def _container(
    name: str,
    image: str,
    cpus: int | float,
    memory_gi: int,
    gpus: int = 0,
    ports: list[dict[str, Any]] | None = None,
    env: list[dict[str, Any]] | None = None,
    mounts: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    res: dict[str, Any] = {"cpu": str(cpus), "memory": f"{memory_gi}Gi"}
    if gpus:
        res["nvidia.com/gpu"] = str(gpus)
    c: dict[str, Any] = {
        "name": name,
        "image": image,
        "workingDir": "/app",  # the repository root in the image: configs/ resolves from here
        "ports": [*(ports or []), {"name": "metrics", "containerPort": METRICS_PORT}],
        "env": [{"name": "OMP_NUM_THREADS", "value": "1"}, *(env or [])],
        "resources": {"requests": dict(res), "limits": dict(res)},
    }
    if mounts:
        c["volumeMounts"] = mounts
    return c


def _template(container: dict[str, Any], volumes: list[dict[str, Any]], **spec: Any):
    out: dict[str, Any] = {"containers": [container], **spec}
    if volumes:
        out["volumes"] = volumes
    return {"metadata": {"labels": dict(LABELS)}, "spec": out}


def _head(
    image: str,
    *,
    dashboard_private: bool,
    extra_ports=(),
    env=(),
    mounts=(),
    volumes=(),
    restart_never: bool = False,
    cpus: int = 2,
    memory_gi: int = 8,
) -> dict[str, Any]:
    params = {"metrics-export-port": str(METRICS_PORT), "num-cpus": "0"}
    if dashboard_private:
        params["dashboard-host"] = "127.0.0.1"
    ports = [{"name": "gcs-server", "containerPort": 6379}, *extra_ports]
    c = _container(
        "ray-head", image, cpus, memory_gi, ports=ports, env=list(env), mounts=list(mounts)
    )
    spec = {"restartPolicy": "Never"} if restart_never else {}
    return {"rayStartParams": params, "template": _template(c, list(volumes), **spec)}


def _group(name: str, replicas: int, container: dict[str, Any], volumes, params=None):
    return {
        "groupName": name,
        "replicas": replicas,
        "minReplicas": replicas,
        "maxReplicas": replicas,
        "rayStartParams": {"metrics-export-port": str(METRICS_PORT), **(params or {})},
        "template": _template(container, list(volumes)),
    }


def _pods(units: int, per_node: int, what: str) -> tuple[int, int]:
    """(pods, units per pod) holding exactly `units`, at most `per_node` per pod."""
    per_pod = min(units, per_node)
    if units % per_pod:
        raise ValueError(
            f"{what}: {units} do not pack into pods of {per_pod} (gpus_per_node={per_node}); "
            f"use a multiple of {per_node}"
        )
    return units // per_pod, per_pod


def _gpu_env(gpu: str | None) -> list[dict[str, Any]]:
    return [{"name": "MOERAY_GPU", "value": gpu}] if gpu else []


def rayjob(
    job: Any,
    config_path: str,
    *,
    tag: str,
    gpus_per_node: int = 8,
    gpu: str | None = None,
    storage: str = RUNS_MOUNT,
) -> list[dict]:
    """RayJob for `job` (a TrainJobConfig read from `config_path`, repository-relative) with its
    run storage: an absolute path, where the PersistentVolumeClaim (also returned) is mounted on
    every pod, or an object-store URI (no volume)."""
    world = job.parallel.world
    image = images(tag)["gpu" if job.use_gpu else "cpu"]
    scheme = uri_scheme(storage)  # ValueError for an unsupported scheme
    shared = scheme in ("", "file")  # a path: the volume is mounted there
    path = urlparse(storage).path if scheme == "file" else storage
    if shared and not path.startswith("/"):
        raise ValueError(
            f"train storage {storage!r} must be an absolute path (the shared volume's mount on "
            "every pod) or a URI (s3://bucket/prefix)"
        )
    runs = {"name": "runs", "persistentVolumeClaim": {"claimName": "moeray-runs"}}
    mount = {"name": "runs", "mountPath": path}
    mounts, volumes = ([mount], [runs]) if shared else ([], [])
    # an object store's credentials (AWS_ACCESS_KEY_ID, ...) where the pods have no role
    env_from = [] if shared else [{"secretRef": {"name": "moeray-storage", "optional": True}}]
    if job.use_gpu:
        pods, per_pod = _pods(world, gpus_per_node, f"{world} GPU workers (pp*ep*dp)")
        worker = _container(
            "ray-worker",
            image,
            2 * per_pod,
            32 * per_pod,
            gpus=per_pod,
            mounts=[*mounts, {"name": "dshm", "mountPath": "/dev/shm"}],
        )
        group = _group("gpu", pods, worker, [*volumes, DSHM], {"num-cpus": str(per_pod)})
    else:
        pods, per_pod = world, 1
        worker = _container("ray-worker", image, 1, 4, mounts=mounts)
        group = _group("cpu", pods, worker, volumes, {"num-cpus": "1"})
    name = f"moeray-train-{job.name}".replace("_", "-").lower()
    entry = f"moeray train --config {config_path} --storage {storage}"
    head = _head(
        image,
        dashboard_private=True,
        env=_gpu_env(gpu),
        mounts=mounts,
        volumes=volumes,
        restart_never=True,
    )
    for g in (head, group):
        if env_from:
            g["template"]["spec"]["containers"][0]["envFrom"] = env_from
    docs = [
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": {"name": name, "labels": dict(LABELS)},
            "spec": {
                "entrypoint": entry,
                # the submitter runs beside the head and reaches the job API on localhost, so the
                # dashboard stays on 127.0.0.1; it needs restartPolicy Never on the head pod
                "submissionMode": "SidecarMode",
                "shutdownAfterJobFinishes": True,
                "ttlSecondsAfterFinished": 600,
                "rayClusterSpec": {
                    "rayVersion": RAY_VERSION,
                    "headGroupSpec": head,
                    "workerGroupSpecs": [group],
                },
            },
        },
    ]
    return [*docs, pvc("moeray-runs", "100Gi")] if shared else docs


def pvc(name: str, size: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "labels": dict(LABELS)},
        "spec": {
            "accessModes": ["ReadWriteMany"],  # every Ray pod mounts it (NFS, CephFS, EFS, ...)
            "resources": {"requests": {"storage": size}},
        },
    }


def read_serve_config(data: dict[str, Any]) -> tuple[ServeConfig, dict[str, Any]]:
    """(ServeConfig, the Serve config file) from a Serve config file or a bare `args` mapping."""
    if "applications" in data:
        apps = data["applications"]
        if len(apps) != 1:
            raise ValueError(f"expected one application in the Serve config, got {len(apps)}")
        cfg = ServeConfig.from_dict(dict(apps[0].get("args") or {}))
        return cfg, data
    cfg = ServeConfig.from_dict(data)
    from moeray.platform.serve.app import serve_config_file  # imports Ray: only for bare args

    return cfg, serve_config_file(cfg)


def serve_gpus(cfg: ServeConfig) -> dict[str, float]:
    """GPUs each engine deployment requests: replicas x ep x gpus_per_replica."""
    ep = cfg.ep or 1  # None: one process per replica (no gang)
    replicas_d = cfg.decode_replicas
    replicas_p = cfg.prefill_replicas
    if cfg.autoscaling is not None:
        replicas_d = replicas_p = int(cfg.autoscaling.get("max_replicas", 1))
    out = {"decode": replicas_d * ep * cfg.gpus_per_replica}
    if cfg.mode == "pd":
        out["prefill"] = replicas_p * ep * cfg.gpus_per_replica
    return out


def rayservice(
    data: dict[str, Any], *, tag: str, gpus_per_node: int = 8, gpu: str | None = None
) -> list[dict]:
    cfg, file = read_serve_config(data)
    if cfg.api_key:
        raise ValueError("the serve config holds api_key: keep it in the moeray-api-key Secret")
    file = json.loads(json.dumps(file))  # a copy
    file["http_options"] = {"host": "0.0.0.0", "port": cfg.port}  # reachable through the service
    file["applications"][0]["args"].pop("api_key", None)
    image = images(tag)["gpu" if cfg.gpus_per_replica > 0 else "cpu"]
    models = {
        "name": "models",
        "persistentVolumeClaim": {"claimName": "moeray-models", "readOnly": True},
    }
    mounts: list[dict[str, Any]] = [
        {"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    groups = []
    for phase, gpus in serve_gpus(cfg).items():
        replicas = cfg.prefill_replicas if phase == "prefill" else cfg.decode_replicas
        if gpus:
            if gpus != int(gpus):
                raise ValueError(
                    f"{phase}: {gpus} GPUs is not whole; make replicas x ep x "
                    "gpus_per_replica an integer"
                )
            pods, per_pod = _pods(int(gpus), gpus_per_node, f"{phase}: {int(gpus)} GPUs")
        else:
            pods, per_pod = replicas, 0
        cpus = math.ceil(cfg.cpus_per_replica * replicas / pods) + 1
        c = _container(
            "ray-worker",
            image,
            cpus,
            16 + 32 * per_pod,
            gpus=per_pod,
            env=[API_KEY_ENV],
            mounts=mounts,
        )
        groups.append(_group(phase, pods, c, [models, DSHM]))
    head = _head(
        image,
        dashboard_private=False,
        extra_ports=[
            {"name": "dashboard", "containerPort": 8265},
            {"name": "serve", "containerPort": SERVE_PORT},
        ],
        env=[API_KEY_ENV, *_gpu_env(gpu)],
        mounts=mounts[:1],
        volumes=[models],
        cpus=4,
        memory_gi=16,
    )
    head["template"]["spec"]["containers"][0]["readinessProbe"] = {
        "httpGet": {"path": "/health", "port": SERVE_PORT},
        "initialDelaySeconds": 30,
        "periodSeconds": 10,
    }
    return [
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayService",
            "metadata": {"name": "moeray", "labels": dict(LABELS)},
            "spec": {
                "serviceUnhealthySecondThreshold": 900,  # loading a large checkpoint takes minutes
                "deploymentUnhealthySecondThreshold": 900,
                "serveConfigV2": yaml.safe_dump(file, sort_keys=False),
                "rayClusterConfig": {
                    "rayVersion": RAY_VERSION,
                    "headGroupSpec": head,
                    "workerGroupSpecs": groups,
                },
            },
        },
        pvc("moeray-models", "2Ti"),
    ]


def raycluster(*, tag: str, gpus_per_node: int = 8) -> list[dict]:
    """A development cluster: a head and one GPU node, for `ray job submit` and `moeray serve`."""
    image = images(tag)["gpu"]
    worker = _container(
        "ray-worker",
        image,
        32,
        256,
        gpus=gpus_per_node,
        env=[API_KEY_ENV],
        mounts=[{"name": "dshm", "mountPath": "/dev/shm"}],
    )
    head = _head(
        image,
        dashboard_private=True,
        extra_ports=[
            {"name": "client", "containerPort": 10001},
            {"name": "serve", "containerPort": SERVE_PORT},
        ],
        env=[API_KEY_ENV],
        cpus=4,
        memory_gi=16,
    )
    return [
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": {"name": "moeray", "labels": dict(LABELS)},
            "spec": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": False,
                "headGroupSpec": head,
                "workerGroupSpecs": [_group("gpu", 1, worker, [DSHM])],
            },
        }
    ]


def grafana_configmaps() -> list[dict]:
    """The dashboards (for Grafana's sidecar, label grafana_dashboard) and the provisioning
    files, generated by platform/dashboards.py."""
    files = dashboards.rendered_files()
    boards = {k: v for k, v in files.items() if k.endswith(".json")}
    prov = {k.replace("/", "_"): v for k, v in files.items() if not k.endswith(".json")}
    meta = {"labels": {**LABELS, "grafana_dashboard": "1"}}
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "moeray-grafana-dashboards", **meta},
            "data": boards,
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "moeray-grafana-provisioning", "labels": dict(LABELS)},
            "data": prov,
        },
    ]
