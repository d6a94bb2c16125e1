"""`moeray serve --write-config`, the shipped Serve configs, and ServeConfig validation (no Ray
cluster)."""

import dataclasses
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from moeray.platform.config import KV_TRANSPORTS, ServeConfig  # noqa: E402
from moeray.platform.serve.app import _decode_request_router  # noqa: E402
from moeray.platform.serve.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_write_config_round_trips_the_flags(tmp_path):
    f = tmp_path / "serve.yaml"
    assert (
        main(
            [
                "--model",
                "/m/dir",
                "--mode",
                "pd",
                "--prefill-replicas",
                "3",
                "--decode-replicas",
                "5",
                "--port",
                "9123",
                "--kv-transport",
                "channel",
                "--cpus-per-replica",
                "0.25",
                "--api-key",
                "sk-secret",
                "--max-body-bytes",
                "65536",
                "--no-async-scheduling",
                "--no-async-scheduling-sampled",
                "--async-scheduling-prefill",
                "--kv-transfer-timeout-s",
                "12.5",
                "--prefill-timeout-s",
                "90",
                "--routing-stats-period-s",
                "0.5",
                "--write-config",
                str(f),
            ]
        )
        == 0
    )
    text = f.read_text()
    assert "sk-secret" not in text and "MOERAY_API_KEY" in text
    conf = yaml.safe_load(text)
    (app,) = conf["applications"]
    cfg = ServeConfig.from_dict(app["args"])
    assert (
        cfg.model,
        cfg.prefill_replicas,
        cfg.decode_replicas,
        cfg.port,
        cfg.kv_transport,
        cfg.cpus_per_replica,
        cfg.api_key,
        cfg.max_body_bytes,
        cfg.async_scheduling,
        cfg.async_scheduling_sampled,
        cfg.async_scheduling_prefill,
        cfg.kv_transfer_timeout_s,
        cfg.prefill_timeout_s,
        cfg.routing_stats_period_s,
    ) == ("/m/dir", 3, 5, 9123, "channel", 0.25, None, 65536, False, False, True, 12.5, 90.0, 0.5)
    assert (
        conf["http_options"]["port"] == 9123
        and app["import_path"] == "moeray.platform.serve.app:build"
    )


def test_ep_flags_reach_the_written_config(tmp_path):
    f = tmp_path / "ep.yaml"
    argv = ["--model", "/m/dir", "--mode", "colocated", "--ep", "2", "--ep-timeout-s", "45"]
    assert main([*argv, "--write-config", str(f)]) == 0
    (app,) = yaml.safe_load(f.read_text())["applications"]
    cfg = ServeConfig.from_dict(app["args"])
    assert (cfg.ep, cfg.ep_timeout_s) == (2, 45.0)


def test_engine_flags_reach_the_engine_config(tmp_path):
    """The vLLM-named flags go through the written config to the engines' EngineConfig;
    a replica on a fraction of a GPU sizes its cache from that share unless told otherwise."""
    from moeray.platform.serve.worker import engine_config

    f = tmp_path / "engine.yaml"
    argv = ["--model", "/m/dir", "--served-model-name", "m1", "--max-num-seqs", "24"]
    argv += ["--max-num-batched-tokens", "1024"]
    argv += ["--block-size", "32", "--num-pages", "500", "--gpu-memory-utilization", "0.4"]
    assert main([*argv, "--no-enable-prefix-caching", "--write-config", str(f)]) == 0
    (app,) = yaml.safe_load(f.read_text())["applications"]
    assert app["args"]["model_id"] == "m1"
    e = engine_config(ServeConfig.from_dict(app["args"]), "cuda")
    got = (e.max_num_seqs, e.max_num_batched_tokens, e.page_size, e.num_pages)
    assert (*got, e.gpu_memory_utilization) == (24, 1024, 32, 500, 0.4)
    assert e.enable_prefix_caching is False
    assert engine_config(ServeConfig(model="m"), "cpu").enable_prefix_caching is True
    half = ServeConfig(model="m", gpus_per_replica=0.5)
    assert engine_config(half, "cuda").gpu_memory_utilization == 0.5
    set_share = half.replace(gpu_memory_utilization=0.3)
    assert engine_config(set_share, "cuda").gpu_memory_utilization == 0.3
    for whole in (0.0, 1.0, 2.0):  # CPU, or a GPU (or more) of its own: all free memory
        cfg = ServeConfig(model="m", gpus_per_replica=whole)
        assert engine_config(cfg, "cuda").gpu_memory_utilization is None


def test_bad_flags_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        main(["--kv-transport", "carrier-pigeon"])
    assert main(["--decode-replicas", "0", "--write-config", "/dev/null"]) == 2
    assert "decode_replicas=0" in capsys.readouterr().err
    assert main(["--max-body-bytes", "0", "--write-config", "/dev/null"]) == 2
    assert "max_body_bytes=0" in capsys.readouterr().err
    assert main(["--num-speculative-tokens", "9", "--write-config", "/dev/null"]) == 2
    assert "num_speculative_tokens=9" in capsys.readouterr().err
    assert main(["--prefill-timeout-s", "0", "--write-config", "/dev/null"]) == 2
    assert "prefill_timeout_s=0.0 must be > 0" in capsys.readouterr().err
    assert main(["--kv-transfer-timeout-s", "-1", "--write-config", "/dev/null"]) == 2
    assert "kv_transfer_timeout_s=-1.0 must be > 0" in capsys.readouterr().err
    assert main(["--routing-stats-period-s", "0", "--write-config", "/dev/null"]) == 2
    assert "routing_stats_period_s=0.0 must be > 0" in capsys.readouterr().err
    assert main(["--gpu-memory-utilization", "0", "--write-config", "/dev/null"]) == 2
    assert "gpu_memory_utilization=0.0 must be in (0, 1]" in capsys.readouterr().err
    assert main(["--ep-timeout-s", "0", "--write-config", "/dev/null"]) == 2
    assert "ep_timeout_s=0.0 must be > 0" in capsys.readouterr().err
    # several drafts a step are accepted (the serve config carries them to the engine)
    assert main(["--num-speculative-tokens", "3", "--write-config", "/dev/null"]) == 0


@pytest.mark.parametrize("name", ["pd.yaml", "colocated.yaml"])
def test_shipped_serve_configs_parse(name):
    conf = yaml.safe_load((ROOT / "configs" / "serve" / name).read_text())
    args = conf["applications"][0]["args"]
    cfg = ServeConfig.from_dict(args)
    assert cfg.mode == name.split(".")[0] and cfg.kv_transport in KV_TRANSPORTS
    # every setting but the key listed, as `--write-config` writes them: what can be set
    assert set(args) == {f.name for f in dataclasses.fields(ServeConfig)} - {"api_key"}


def test_serve_config_rejects_bad_values():
    for bad, match in (
        ({"kv_transport": "tcp"}, "kv_transport='tcp'"),
        ({"kv_transfer_timeout_s": 0}, "kv_transfer_timeout_s"),
        ({"routing_stats_period_s": -1.0}, "routing_stats_period_s"),
        ({"ep_decode_exchange": "nccl"}, "ep_decode_exchange='nccl'"),
        ({"autoscaling": {"max_replica": 3}}, "max_replica"),
        ({"num_speculative_tokens": 5}, r"num_speculative_tokens=5: accepted 0 \(off\) to 4"),
        ({"num_pages": 0}, r"num_pages=0 must be >= 1 or None"),
        ({"model": ""}, r"model='': give the model directory"),
        ({"max_model_len": 0}, r"max_model_len=0 must be >= 1"),
        ({"cpus_per_replica": -1}, r"cpus_per_replica=-1 must be >= 0"),
        ({"gpus_per_replica": -0.5}, r"gpus_per_replica=-0.5: accepted 0, a fraction"),
        ({"gpus_per_replica": 1.5}, r"gpus_per_replica=1.5: accepted 0, a fraction"),
        ({"gpu_memory_utilization": 1.2}, r"gpu_memory_utilization=1.2 must be in \(0, 1\]"),
    ):
        with pytest.raises(ValueError, match=match):
            ServeConfig(**bad)
    with pytest.raises(ValueError, match="unknown serve settings"):
        ServeConfig.from_dict({"kv_transprot": "rdt"})


def test_decode_request_router_resolves_to_a_serve_request_router():
    from ray.serve._private.utils import import_attr
    from ray.serve.request_router import RequestRouter

    opts = _decode_request_router(ServeConfig(page_size=32, routing_stats_period_s=0.5))
    cls = import_attr(opts["request_router_class"])
    assert issubclass(cls, RequestRouter) and cls.__name__ == "DecodeRequestRouter"
    assert (
        opts["request_router_kwargs"] == {"page_size": 32}
        and opts["request_routing_stats_period_s"] == 0.5
    )


def test_engine_deployments_take_resources_and_autoscaling_from_the_config():
    from moeray.platform.serve.app import _engine_options

    cfg = ServeConfig(gpus_per_replica=1.0, cpus_per_replica=3.0, max_num_seqs=7, max_waiting=5)
    fixed = _engine_options(cfg, 4)
    assert fixed["num_replicas"] == 4 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 3.0, "num_gpus": 1.0}
    assert fixed["max_ongoing_requests"] == 12
    auto = _engine_options(
        cfg.replace(
            autoscaling={"min_replicas": 1, "max_replicas": 6, "target_ongoing_requests": 9}
        ),
        4,
    )
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 6,
        "target_ongoing_requests": 9,
    }


def test_decode_request_router_backs_off_when_no_replica_takes_the_request():
    """Serve's routing loop calls choose_replicas again at once unless the request asks for a
    backoff; as choose_replicas never awaits, that loop starved the router's event loop."""
    import asyncio
    from types import SimpleNamespace

    from ray.serve._private.request_router.common import RequestRoutingContext

    from moeray.actors.decode import decode_request_router_class
    from moeray.platform.serve.worker import DecodeRoutingPolicy

    router = SimpleNamespace(policy=DecodeRoutingPolicy(16))
    replicas = [
        SimpleNamespace(
            replica_id=SimpleNamespace(unique_id=rid), routing_stats={"free_pages": n, "seq": 1}
        )
        for rid, n in (("a", 3), ("b", 9))
    ]
    choose = decode_request_router_class().choose_replicas
    for kwargs, want in (({}, ["b", "a"]), ({"replica": "a"}, ["a"]), ({"replica": "gone"}, [])):
        pending = SimpleNamespace(args=[], kwargs=kwargs, routing_context=RequestRoutingContext())
        ranks = asyncio.run(choose(router, replicas, pending))
        assert [r.replica_id.unique_id for (r,) in ranks] == want
        assert pending.routing_context.should_backoff is True


def test_ep_settings_are_checked():
    for bad, match in (
        ({"ep": 0, "mode": "colocated"}, "ep=0"),
        ({"ep": 2, "kv_transport": "rdt"}, "kv_transport='rdt'"),  # P/D gangs: object store
        ({"load_format": "pt"}, "load_format='pt'"),
        ({"load_format": "dummy"}, "set ep"),
        ({"ep": 2, "mode": "colocated", "ep_timeout_s": 0}, "ep_timeout_s"),
    ):
        with pytest.raises(ValueError, match=match):
            ServeConfig(**bad)
    cfg = ServeConfig(ep=4, mode="colocated", load_format="dummy")
    assert ServeConfig.from_dict(cfg.to_dict()) == cfg
    # MTP drafting under expert parallelism (tests/unit/test_engine_ep_mtp.py), in both modes.
    for mode in ("colocated", "pd"):
        cfg = ServeConfig(ep=2, mode=mode, num_speculative_tokens=1)
        assert ServeConfig.from_dict(cfg.to_dict()) == cfg
