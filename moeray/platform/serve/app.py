"""The serving application: the only place that builds Serve deployments.

    client --HTTP--> Ingress (FastAPI, OpenAI API) --handle, streaming--> Decode replica
                                                         |  asks for the rows it lacks
                                                         v
                                                     Prefill replica (chunked prefill, KV export)
In "colocated" mode one engine deployment does both (the baseline the split is compared with).

`moeray serve --model DIR ...` (serve/cli.py) runs it on a local (or `RAY_ADDRESS`) Ray cluster;
the same application is importable for `serve run` / `serve deploy` through `build(args)`, whose
args are a ServeConfig dict (see `moeray serve --write-config`).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import jinja2

from moeray.actors.decode import ColocatedServer, DecodeServer
from moeray.actors.ep import EPServer
from moeray.actors.prefill import PrefillServer
from moeray.platform.checkpoint import check_checkpoint
from moeray.platform.config import DEFAULT_DEMO_MODEL, ModelConfig, ServeConfig
from moeray.platform.engine.speculative import no_mtp_reason
from moeray.platform.metrics import Metrics
from moeray.platform.serve.generation_config import eos_token_ids, sampling_defaults
from moeray.platform.serve.http.app import build_app
from moeray.platform.serve.http.auth import resolve_api_key
from moeray.platform.serve.http.chat import deepseek_chat_prompt
from moeray.platform.serve.http.protocol import (
    BackendOverloaded,
    BackendUnavailable,
    GenerationRequest,
    GenerationStep,
)
from moeray.platform.serve.http.server import OpenAIServerConfig
from moeray.platform.serve.kv_transport.rdt import RELAY_GPUS
from moeray.platform.serve.tokenizer import ServeTokenizer

APP_NAME = "moeray"


class HandleBackend:
    """The app's GenerationBackend over a Serve handle to a decode/colocated deployment."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle.options(stream=True)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationStep, None]:
        gen = self.handle.generate.remote(request)
        try:
            async for step in gen:
                yield step
        except BackendOverloaded as e:
            # Ray wraps the replica's exception (its message is a task traceback): re-raise the
            # replica's own, so the 429 body carries its message and Retry-After.
            cause = getattr(e, "cause", e)
            raise BackendOverloaded(str(cause), retry_after_s=cause.retry_after_s) from None
        except BackendUnavailable as e:
            cause = getattr(e, "cause", e)
            raise BackendUnavailable(str(cause), retry_after_s=cause.retry_after_s) from None
        except Exception as e:
            import ray.exceptions

            if isinstance(e, ray.exceptions.RayActorError):  # the replica itself died
                raise BackendUnavailable(
                    "the serving replica failed during the request and is being replaced; "
                    "retry the request"
                ) from e
            raise
        finally:
            # Client gone, stop string hit, or done: cancelling the replica's generator aborts the
            # request there, which frees its KV pages at once.
            gen.cancel()


class Ingress:
    def __init__(self, config: dict[str, Any], backend: Any) -> None:
        self.cfg = ServeConfig.from_dict(config)
        self.tokenizer = ServeTokenizer(self.cfg.model)
        model = ModelConfig.from_hf(self.cfg.model)
        self.max_context = min(
            self.cfg.max_model_len or model.max_position_embeddings, model.max_position_embeddings
        )
        self.backend = HandleBackend(backend)

    def __serve_build_asgi_app__(self):
        server_cfg = OpenAIServerConfig(
            model_id=self.cfg.served_model_id,
            max_context=self.max_context,
            max_in_flight=self.cfg.max_in_flight,
            max_body_bytes=self.cfg.max_body_bytes,
            api_key=resolve_api_key(self.cfg.api_key),
            created=int(time.time()),
            sampling_defaults=sampling_defaults(self.cfg.model),
            tool_call_parser=self.cfg.tool_call_parser,
        )
        return build_app(
            self.backend,
            self.tokenizer,
            server_cfg,
            metrics=Metrics("ray", default_labels={"model": self.cfg.served_model_id}),
            chat_template=self.tokenizer.chat_template(self.cfg.chat_template)
            or deepseek_chat_prompt,
        )


def _engine_options(
    cfg: ServeConfig, replicas: int, *, reject_overflow: bool = False
) -> dict[str, Any]:
    """Serve options of an engine deployment. With `reject_overflow` (the deployments that stream
    to clients) Serve lets one more request through than the engine holds, so a full replica
    answers BackendOverloaded (429 at the API) instead of Serve queueing the excess at the handle
    without bound; the prefill keeps the plain cap (its overflow would only turn into
    recomputes)."""
    cap = cfg.max_num_seqs + cfg.max_waiting + (1 if reject_overflow else 0)
    gpus = cfg.gpus_per_replica
    if cfg.mode == "pd" and cfg.kv_transport == "rdt" and gpus >= 1:
        # RDT's relay actors (kv_transport/rdt.py) take RELAY_GPUS each and must sit on different
        # GPUs; whole-GPU replicas would leave them unplaceable (transfers then time out and
        # recompute).
        gpus -= RELAY_GPUS
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.cpus_per_replica, "num_gpus": gpus},
        "max_ongoing_requests": cap,
    }
    if cfg.autoscaling is not None:
        opts["autoscaling_config"] = dict(cfg.autoscaling)
    else:
        opts["num_replicas"] = replicas
    return opts


def _decode_request_router(cfg: ServeConfig) -> dict[str, Any]:
    """Decode replicas: most free KV pages first, affinity to the one holding a prompt's prefix
    (moeray.actors.decode.DecodeRequestRouter); replicas report free pages every
    routing_stats_period_s. Prefill keeps Serve's default power-of-two request router, which sends
    to the shorter queue."""
    return {
        "request_router_class": "moeray.actors.decode:DecodeRequestRouter",
        "request_router_kwargs": {"page_size": cfg.page_size},
        "request_routing_stats_period_s": cfg.routing_stats_period_s,
        "request_routing_stats_timeout_s": max(5.0, 5 * cfg.routing_stats_period_s),
    }


def check_model_dir(cfg: ServeConfig) -> list[str]:
    """Check in this process what every replica will load, before anything is deployed: a bad
    directory then fails with its cause instead of Serve's "Failed to update the deployments"
    (the cause left in a replica's log). config.json parses into a ModelConfig, every tensor the
    model needs is in the safetensors files with its shape (read from the headers, no tensor data),
    speculative decoding finds MTP weights, `weights="fp8"` finds an FP8 checkpoint, the
    tokenizer and its chat template load, and generation_config.json (when there is one) gives
    valid sampling defaults. Raises ValueError with the cause; returns the notes to show (a model
    loaded without MTP, a generation_config.json setting not applied)."""
    path = Path(cfg.model)
    if not (path / "config.json").exists():
        raise ValueError(
            f"no model at {cfg.model!r} (config.json missing)"
            + ("; train one with `make demo`" if cfg.model == DEFAULT_DEMO_MODEL else "")
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if cfg.load_format == "dummy":  # random weights: config.json alone
                config, missing_mtp = ModelConfig.from_hf(path), 0
            else:
                config, missing_mtp = check_checkpoint(path)
        except TypeError as e:  # a config.json value of the wrong type
            raise ValueError(f"{path / 'config.json'}: {e}") from None
        if cfg.ep is not None and config.n_routed_experts % cfg.ep:
            raise ValueError(
                f"--ep {cfg.ep} does not divide the model's {config.n_routed_experts} routed "
                "experts: accepted a divisor of it"
            )
        slots = config.n_routed_experts + cfg.ep_redundant_experts
        if cfg.ep_placement_period_s > 0:
            if cfg.ep is None or slots % cfg.ep:
                raise ValueError(
                    f"live expert placement needs --ep dividing the {slots} expert slots "
                    f"({config.n_routed_experts} experts + --ep-redundant-experts "
                    f"{cfg.ep_redundant_experts}); got --ep {cfg.ep}"
                )
            if cfg.load_format == "dummy":
                raise ValueError(
                    "live expert placement reads experts from the checkpoint files: not with "
                    "--load-format dummy"
                )
        if cfg.weights == "fp8" and config.quantization_config is None:
            raise ValueError(
                "--weights fp8 keeps an FP8 checkpoint's e4m3 weights, but its config.json has "
                "no quantization_config (fp8): use --weights dequantize"
            )
        if cfg.num_speculative_tokens and config.num_nextn_predict_layers == 0:
            raise ValueError(no_mtp_reason(config.num_hidden_layers, missing_mtp))
        try:
            tokenizer = ServeTokenizer(path)
            tokenizer.chat_template()
        except Exception as e:  # tokenizers, json and jinja2 raise their own types
            raise ValueError(f"its tokenizer does not load: {type(e).__name__}: {e}") from None
        if cfg.chat_template:
            try:
                tokenizer.chat_template(cfg.chat_template)
            except jinja2.TemplateError as e:
                raise ValueError(f"chat_template does not parse: {e}") from None
        sampling_defaults(path)
        eos_token_ids(path)
    return [str(w.message) for w in caught]


def build_serve_app(cfg: ServeConfig):
    """The Serve application for `cfg` (deployments bound, not yet running); raises ValueError
    when the model directory cannot be served (check_model_dir)."""
    from ray import serve

    check_model_dir(cfg)
    args = cfg.to_dict()
    # serve.deployment(options)(cls), the decorator form: the form Ray's annotations describe.
    if cfg.ep is not None:
        # Each replica is a gang's front; its N rank actors hold the resources (actors/ep.py).
        opts = _engine_options(cfg, cfg.decode_replicas, reject_overflow=True)
        opts["ray_actor_options"] = {"num_cpus": 0}
        opts["max_ongoing_requests"] = cfg.ep * (cfg.max_num_seqs + cfg.max_waiting) + 1
        # A dead rank stalls its peers' collectives: notice it (EPServer.check_health) within
        # seconds, not Serve's default 10 s period.
        opts["health_check_period_s"] = 2.0
        if cfg.mode == "colocated":
            backend = serve.deployment(name="EP", **opts)(EPServer).bind(args)
        else:
            pre = {**opts, **_engine_options(cfg, cfg.prefill_replicas)}
            pre["ray_actor_options"] = {"num_cpus": 0}
            pre["max_ongoing_requests"] = opts["max_ongoing_requests"]
            prefill = serve.deployment(name="Prefill", **pre)(EPServer).bind(args, "prefill")
            backend = serve.deployment(name="Decode", **opts)(EPServer).bind(
                args, "decode", prefill
            )
    elif cfg.mode == "colocated":
        backend = serve.deployment(
            name="Colocated",
            **_engine_options(cfg, cfg.decode_replicas, reject_overflow=True),
        )(ColocatedServer).bind(args)
    else:
        prefill = serve.deployment(name="Prefill", **_engine_options(cfg, cfg.prefill_replicas))(
            PrefillServer
        ).bind(args)
        backend = serve.deployment(
            name="Decode",
            request_router_config=_decode_request_router(cfg),
            **_engine_options(cfg, cfg.decode_replicas, reject_overflow=True),
        )(DecodeServer).bind(args, prefill)
    ingress = serve.deployment(
        name="Ingress",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=cfg.max_in_flight * 2,
    )(serve.ingress()(Ingress))
    return ingress.bind(args, backend)


def build(args: dict[str, Any]):
    """Application builder for Serve config files:
    `import_path: moeray.platform.serve.app:build`."""
    return build_serve_app(ServeConfig.from_dict(dict(args)))


def serve_config_file(cfg: ServeConfig) -> dict[str, Any]:
    """A Serve config (for `serve run F` / `serve deploy F`) equal to the `moeray serve` flags."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "moeray.platform.serve.app:build",
                "args": {k: v for k, v in cfg.to_dict().items() if k != "api_key"},
            }
        ],
    }


def start(
    cfg: ServeConfig, *, blocking: bool = False, name: str = APP_NAME, route_prefix: str = "/"
):
    """Start Serve on the current Ray cluster (a local one when none) and deploy the app.

    The API key (--api-key, else $MOERAY_API_KEY here) is resolved now and handed to the ingress,
    so it holds even when the cluster's processes do not share this shell's environment."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False
        )
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    cfg = cfg.replace(api_key=resolve_api_key(cfg.api_key))
    return serve.run(build_serve_app(cfg), name=name, route_prefix=route_prefix, blocking=blocking)
