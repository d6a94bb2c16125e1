"""`moeray bench engine`: decode and prefill throughput of the engine, against transformers'
`generate` on the same weights and against the memory/compute roofline, plus MTP speedup.

Steps (GPU, bf16, the `small()` preset by default):
  1. The model: with `--mtp-train-steps N > 0` (default) built and trained briefly (main + MTP
     loss) on a synthetic text, a cycle through a random permutation of `--cycle-len` distinct
     tokens, so MTP drafts on "text the model was trained on" can be accepted. With
     `--mtp-train-steps 0` (speed runs at real shapes: `--preset moonlight_16b_a3b`, `--config
     config.json`, `--layers 4`) random weights made directly on the device (bench/model.py),
     without MTP. `--weights fp8` stores the projections as e4m3 + 128x128 scales, as
     `moeray serve --weights fp8` loads the official checkpoint.
  2. Decode tokens/s at each batch size: prompts of --prompt-len tokens prefilled first, then
     --decode-tokens decode steps timed (greedy, or sampled at --temperature); the roofline of
     each (bench/roofline.py) at the datasheet and at the measured bandwidth; the GPU time of
     one replay of the batch's decode graph (the forward alone) and the host time of a step by
     phase (schedule, inputs and launch, forward and sampling, update and outputs:
     bench/profile.py); with `--profile-steps N` the kernels of N decode steps by category.
  3. Prefill tokens/s: --prefill-batch random prompts of --prefill-len tokens, one output token,
     through MLA's expanded path (the engine's default for prefill) and through the absorbed one.
  4. transformers' generate on the same weights (saved as an HF directory): n tokens minus 1.
     Skipped for FP8 weights and for models above --hf-max-weight-gib.
  5. MTP: decode at batch 1 and 16 on corpus prompts without the drafter, with synchronous MTP
     steps and with MTP steps under async scheduling (the default); greedy, and sampled too at
     --temperature (bench/mtp.py).
`--skip prefill,router-ab,hf,mtp` leaves sections out. `--ab NAME,...` times each named fast-path
switch flipped alone on the same weights and prompts after step 3 (bench/ab.py); `--arrivals N`
times requests arriving mid-decode with async scheduling through admissions off and on
(bench/arrivals.py). Known GPUs use
their datasheet numbers (H100 SXM 3.35 TB/s, H200 4.8 TB/s, 989 dense bf16 TFLOPS); others a
measured copy bandwidth and matmul.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

from moeray.kernels.common import pdl_launch
from moeray.platform.checkpoint import save_model
from moeray.platform.config import ModelConfig
from moeray.platform.engine.bench.ab import ab_table, run_ab, switch_env
from moeray.platform.engine.bench.args import parse_args
from moeray.platform.engine.bench.arrivals import arrivals_ab
from moeray.platform.engine.bench.decode import (
    decode_room,
    engine_decode,
    hf_decode,
    step_outliers,
    sync,
    warm_decode,
)
from moeray.platform.engine.bench.model import quantize_fp8_, random_model
from moeray.platform.engine.bench.mtp import mtp_speedup
from moeray.platform.engine.bench.profile import decode_graph_ms, host_phases, profile_decode
from moeray.platform.engine.bench.roofline import decode_roofline, step_bytes, vs_peers
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.engine.step_graphs import graph_seconds
from moeray.platform.model.transformer import Transformer
from moeray.results import device_slug, write_result

SPEC = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12)}  # (bytes/s, bf16 dense FLOP/s)


def measure_machine(device) -> dict:
    """Measured copy bandwidth (read + write bytes/s) and matmul FLOP/s, and the datasheet numbers
    when the GPU is known; the roofline uses the datasheet where there is one."""
    n = (256 if device.type == "cuda" else 32) * 1024**2
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    sync(device)
    bw = 2 * n * 5 / (time.perf_counter() - t)
    m = 4096 if device.type == "cuda" else 512
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(m, m, device=device, dtype=dt)
    a @ a
    sync(device)
    t = time.perf_counter()
    for _ in range(5):
        a @ a
    sync(device)
    flops = 2 * m**3 * 5 / (time.perf_counter() - t)
    out = {
        "measured_bandwidth_Bps": bw,
        "measured_flops": flops,
        "bandwidth_Bps": bw,
        "peak_flops": flops,
        "source": "measured",
    }
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (b, f) in SPEC.items():
            if key in name:
                out.update(bandwidth_Bps=b, peak_flops=f, source=f"datasheet {key}")
                break
    return out


def train_on_cycle(
    model,
    cycle,
    steps: int,
    device,
    *,
    seq_len: int = 128,
    batch: int = 8,
    lr: float = 1e-3,
    mtp_weight: float = 0.3,
) -> list[float]:
    """A few AdamW steps of next-token + MTP loss on windows of the cyclic corpus."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    for _ in range(steps):
        starts = torch.randint(0, len(cycle), (batch,), generator=g)
        ids = cycle[(starts[:, None] + torch.arange(seq_len + 1)) % len(cycle)].to(device)
        if amp is not None:
            with amp:
                out = model(ids[:, :-1], return_mtp=True)
        else:
            out = model(ids[:, :-1], return_mtp=True)
        V = out.logits.shape[-1]
        loss = F.cross_entropy(out.logits.float().reshape(-1, V), ids[:, 1:].reshape(-1))
        if out.mtp_logits:
            loss = loss + mtp_weight * F.cross_entropy(
                out.mtp_logits[0].float().reshape(-1, V), ids[:, 2:].reshape(-1)
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _model_config(a: argparse.Namespace) -> ModelConfig:
    """The shape to run: preset or config.json, cut to --layers; dense layers first, as in the
    original: --dense-layers of them, else min(first_k_dense_replace, layers) (DeepSeek-V3 has 3);
    no MTP when it is not trained."""
    cfg = a.model_config
    layers = cfg.num_hidden_layers if a.layers is None else a.layers
    dense = cfg.first_k_dense_replace if a.dense_layers is None else a.dense_layers
    if dense > layers:
        raise ValueError(f"--dense-layers {dense} > {layers} layers: expected at most {layers}")
    cfg = cfg.replace(num_hidden_layers=layers, first_k_dense_replace=min(dense, layers))
    if a.mtp_train_steps == 0:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    return cfg.replace(eos_token_id=None)  # fixed-length generations on both sides


def _random_prompts(g: torch.Generator, vocab: int, n: int, length: int) -> list[list[int]]:
    return _prompts_of(g, vocab, [length] * n)


def _prompts_of(g: torch.Generator, vocab: int, lengths: list[int]) -> list[list[int]]:
    """Random prompts, one of each length."""
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


def _hf_skip_reason(a: argparse.Namespace, weight_bytes: int) -> str | None:
    if "hf" in a.skip:
        return "--skip hf"
    if a.weights == "fp8":
        return "fp8 weights: the transformers baseline runs bf16 weights"
    if weight_bytes > a.hf_max_weight_gib * 1024**3:
        return (
            f"{weight_bytes / 1024**3:.1f} GiB of weights > --hf-max-weight-gib "
            f"{a.hf_max_weight_gib} (transformers needs a saved copy and a second model)"
        )
    if not any(B <= a.hf_max_batch for B in a.batch_sizes):
        return f"every batch size is above --hf-max-batch {a.hf_max_batch}"
    return None


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        cfg = _model_config(a)
    except ValueError as e:
        print(f"moeray bench engine: {e}", file=sys.stderr)
        return 2
    prefill_len = a.prefill_len or 8 * a.prompt_len
    cycle_len = min(a.cycle_len, cfg.vocab_size)
    torch.manual_seed(0)
    cycle = torch.randperm(cfg.vocab_size)[:cycle_len]

    t0 = time.perf_counter()
    if a.mtp_train_steps > 0:
        model = Transformer(cfg).to(device)
        losses = train_on_cycle(
            model, cycle, a.mtp_train_steps, device, seq_len=min(128, a.prompt_len), batch=8
        )
        model = model.to(dtype)
        if a.weights == "fp8":
            quantize_fp8_(model)
    else:
        losses = []
        model = random_model(cfg, device, dtype, fp8=a.weights == "fp8")
    build_s = time.perf_counter() - t0
    machine = measure_machine(device)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    step = step_bytes(model, dtype_bytes)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    hf_skipped = _hf_skip_reason(a, weight_bytes)
    bandwidths = {"measured": machine["measured_bandwidth_Bps"]}
    if machine["source"].startswith("datasheet"):
        bandwidths["datasheet"] = machine["bandwidth_Bps"]
    g = torch.Generator().manual_seed(1)
    n = a.decode_tokens
    max_b = max(a.batch_sizes)
    budget = max(4096, max_b * 2)
    # engine_decode's requests run up to n + 1 + room tokens (the whole batch decodes together)
    room = decode_room(max_b, a.prompt_len, budget, drafts=1)
    need_tokens = max(max_b * (a.prompt_len + n + room + 66), a.prefill_batch * (prefill_len + 2))
    ecfg = dict(
        page_size=64,
        num_pages=need_tokens // 64 + 2 * max_b + 8,
        max_num_seqs=max_b,
        max_num_batched_tokens=budget,
        enable_prefix_caching=False,
        use_cuda_graphs=not a.no_cuda_graphs,
        async_scheduling=a.async_scheduling,
        async_scheduling_sampled=a.async_sampled,
        # room for profile_decode's requests (64 tokens past the profiled steps)
        max_model_len=max(prefill_len, a.prompt_len + max(n + room, a.profile_steps + 64)) + 8,
    )

    decode: dict[str, float] = {}
    step_ms: dict[str, float] = {}
    step_median_ms: dict[str, float] = {}
    outliers: dict[str, list[list[float]]] = {}
    async_drains: dict[str, int] = {}  # timed steps that drained async scheduling, by batch
    roof: dict[str, float] = {}
    frac: dict[str, float] = {}
    frac_measured: dict[str, float] = {}
    roofline: dict[str, dict] = {}
    profiles: dict[str, dict] = {}
    graph_ms: dict[str, float] = {}
    phases: dict[str, dict[str, float]] = {}
    hf_rate: dict[str, float] = {}
    notes: dict[str, Any] = {}
    main_prompts: dict[int, list[list[int]]] = {}
    main_outputs: dict[str, list[list[int]]] = {}
    t0 = time.perf_counter()
    engine = Engine(model, EngineConfig(**ecfg))
    # the engine's start: its graph captures (decode sizes, prefill-chunk buckets) and their
    # Triton compiles; the graphs it holds, by kind
    notes["engine_build_s"] = time.perf_counter() - t0
    notes["graphs"] = dict(Counter(kind for _bs, _S, kind in engine.runner.graphs))
    notes["graph_seconds"] = graph_seconds(engine.runner.graphs)  # by kind, compiles apart
    for B in a.batch_sizes:
        prompts = main_prompts[B] = _random_prompts(g, cfg.vocab_size, B, a.prompt_len)
        # Warm up with the whole batch: the decode graphs are captured when the engine starts, but
        # a prefill of B prompts compiles Triton kernels for its own token counts, which a batch-1
        # warm-up leaves inside the timed loop (benchmarks/notes-engine.md).
        engine_decode(engine, prompts, 2, temperature=a.temperature)
        seconds: list[float] = []
        drained: list[int] = []
        rate, outputs = engine_decode(engine, prompts, n, seconds, a.temperature, drained)
        if drained:
            async_drains[str(B)] = drained[0]
        k = str(B)
        main_outputs[k] = outputs
        decode[k] = rate
        step_ms[k] = 1e3 * B / rate
        # the mean step above carries every host hiccup; the median step is the typical one
        step_median_ms[k] = 1e3 * statistics.median(seconds)
        outliers[k] = step_outliers(seconds)
        roofline[k] = decode_roofline(
            step, cfg, B, a.prompt_len + n // 2, bandwidths, machine["peak_flops"]
        )
        bound = roofline[k]["tokens_per_s"]
        roof[k] = bound.get("datasheet", bound["measured"])
        frac[k] = rate / roof[k]
        frac_measured[k] = rate / bound["measured"]
        # The forward alone (one graph replay) against the whole step: what the GPU spends on the
        # model, and what the step adds around it (host work, sampling, the sampled ids' read-back).
        replay = decode_graph_ms(engine, B)
        if replay is not None:
            graph_ms[k] = replay
        phases[k] = host_phases(engine, prompts, max(8, min(32, n)))
        if a.profile_steps:
            profiles[k] = profile_decode(engine, prompts, a.profile_steps)
    notes["cuda_graphs"] = engine.runner.graph_status
    notes["async_scheduling"] = engine.async_scheduling
    notes["async_scheduling_sampled"] = a.async_sampled
    notes["temperature"] = a.temperature
    notes["fast_path_env"] = switch_env()  # every switch (bench/ab.py), defaults filled in
    notes["pdl"] = pdl_launch(device)  # the switch and the GPU (sm_90+) together
    notes["attention_calls"] = dict(engine.runner.attention_calls)
    # the memory the small FP8 layers' bf16 copies take (model/quant.py's FP8_AS_BF16)
    notes["fp8_as_bf16_gib"] = round(engine.fp8_as_bf16_bytes / 2**30, 3)

    prefill = None
    prefill_by_path: dict[str, float] = {}
    if "prefill" not in a.skip:
        prompts = _random_prompts(g, cfg.vocab_size, a.prefill_batch, prefill_len)
        prefill_by_path["expanded"] = prefill = _prefill_rate(engine, prompts, device)
        del engine
        # Same settings, prefill chunks in MLA's latent space; no decode graphs (none replay).
        engine = Engine(
            model,
            EngineConfig(**{**ecfg, "use_cuda_graphs": False}, prefill_attention="absorbed"),
        )
        prefill_by_path["absorbed"] = _prefill_rate(engine, prompts, device)
    del engine
    if a.arrivals:
        if a.arrival_prompt_lens is None:
            lens = [a.prompt_len] * a.arrivals
        else:
            lo, hi = a.arrival_prompt_lens
            lens = torch.randint(lo, hi + 1, (a.arrivals,), generator=g).tolist()
        notes["arrivals"] = arrivals_ab(
            lambda **kw: Engine(model, EngineConfig(**{**ecfg, **kw})),
            _prompts_of(g, cfg.vocab_size, lens),
            _prompts_of(g, cfg.vocab_size, lens),
            n,
            a.arrival_every,
            a.arrival_graph_tokens,
            a.arrival_burst,
            a.arrival_graph_seqs,
        )
        arr = notes["arrivals"]
        keys: tuple[str, ...] = ("on_vs_off", "on_vs_sync", "outputs_equal", "on_equals_sync")
        if a.arrival_graph_tokens:
            keys += ("sync_vs_eager", "sync_equals_eager", "sync_equals_absorbed")
        keys += tuple(k for k in ("sync_vs_single", "sync_equals_single") if k in arr)
        print("arrivals", {k: arr[k] for k in keys})
        for arm in ("sync", "eager", "single") if a.arrival_graph_tokens else ("sync",):
            if arm not in arr:
                continue
            print(arm, {k: arr[arm][k] for k in ("mixed_step_ms", "decode_step_ms", "build_s")})
    if a.ab:
        notes["ab"] = run_ab(
            a.ab,
            lambda: Engine(model, EngineConfig(**ecfg)),
            lambda eng, prompts: warm_decode(eng, prompts, n, a.temperature),
            decode_graph_ms,
            main_prompts,
            decode,
            graph_ms,
            main_outputs,
            roof,
        )
        print("\n".join(ab_table(notes["ab"])))
    if device.type == "cuda" and "router-ab" not in a.skip:
        # A/B of the fused MoE gate (kernels/gate.py) against its PyTorch reference, same engine
        # settings, at batch 16 and the largest batch: the gate's row limit
        # (common.ROUTE_BATCH_MAX_TOKENS) rests on this comparison (benchmarks/notes-engine.md).
        ab = {}
        with mock.patch.dict(os.environ, {"MOERAY_FUSED_GATE": "0"}):
            engine = Engine(model, EngineConfig(**ecfg))
            for B in sorted({min(16, max_b), max_b}):
                prompts = _random_prompts(g, cfg.vocab_size, B, a.prompt_len)
                engine_decode(engine, prompts, 2)
                ab[str(B)] = engine_decode(engine, prompts, n)[0]
            del engine
        notes["decode_tokens_per_s_pytorch_router"] = ab

    if hf_skipped is None:
        hf_rate = _hf_baseline(model, cfg, a, g, device, dtype)

    mtp: dict[str, dict] = {}
    mtp_skipped = (
        "--skip mtp"
        if "mtp" in a.skip
        else "--mtp-train-steps 0: no MTP module"
        if a.mtp_train_steps == 0
        else "the config has no MTP layer"
        if not cfg.num_nextn_predict_layers
        else None
    )
    if mtp_skipped is None:
        mtp = mtp_speedup(model, cycle, ecfg, a, g, max_b)

    result: dict[str, Any] = {
        "model": {
            "preset": (a.preset or "small") if a.config is None else None,
            "config": a.config,
            "num_hidden_layers": cfg.num_hidden_layers,
            "first_k_dense_replace": cfg.first_k_dense_replace,
            "parameters": cfg.num_parameters(),
            "active_parameters": cfg.num_parameters(activated=True),
            "weight_bytes": weight_bytes,
            "weights": a.weights,
            "dtype": str(dtype).removeprefix("torch."),
            "build_seconds": build_s,
        },
        "settings": {
            "prompt_len": a.prompt_len,
            "decode_tokens": n,
            "prefill_len": prefill_len,
            "prefill_batch": a.prefill_batch,
            "page_size": 64,
            "profile_steps": a.profile_steps,
            "skipped_sections": sorted(a.skip),
        },
        "decode_tokens_per_s": decode,
        "decode_step_ms": step_ms,
        "decode_step_ms_median": step_median_ms,
        "decode_step_outliers_ms": outliers,  # [[step, ms]] over OUTLIER_FACTOR x the median
        "decode_async_drains": async_drains,  # timed steps that drained async scheduling
        "hf_generate_tokens_per_s": hf_rate,
        "hf_skipped": hf_skipped,
        "speedup_vs_hf": {b: decode[b] / hf_rate[b] for b in hf_rate},
        "prefill_tokens_per_s": prefill,
        "prefill_tokens_per_s_by_attention": prefill_by_path,
        "roofline_tokens_per_s": roof,
        "roofline_fraction": frac,
        "roofline_fraction_measured_bandwidth": frac_measured,
        # GPU time of the batch's decode graph (the forward alone) and the rest of each step
        "decode_graph_ms": graph_ms,
        "decode_outside_graph_ms": {b: step_ms[b] - graph_ms[b] for b in graph_ms},
        # host time by phase of a decode step (profile.host_phases; medians, no syncs added)
        "decode_host_phases_ms": phases,
        "roofline_fraction_graph": {
            b: roofline[b]["step_us"].get("datasheet", roofline[b]["step_us"]["measured"])
            / 1e3
            / graph_ms[b]
            for b in graph_ms
        },
        # batch 1 against published figures, each on its own roofline basis
        "vs_peers_batch1": vs_peers(frac.get("1"), frac_measured.get("1")),
        "roofline": roofline,
        "roofline_machine": machine,
        "decode_profile": profiles,
        "mtp_acceptance": mtp["1"]["acceptance"] if mtp else None,
        "mtp_speedup": mtp["1"]["speedup"] if mtp else None,
        "mtp": mtp,
        "mtp_skipped": mtp_skipped,
        "mtp_training": {
            "steps": a.mtp_train_steps,
            "seconds": build_s if a.mtp_train_steps else 0.0,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "cycle_len": cycle_len,
        },
        "engine": notes,
    }
    if a.note:
        result["note"] = a.note
    name = f"engine-{device_slug()}" + (f"-{a.tag}" if a.tag else "")
    path = write_result(name, result, directory=None if a.out_dir is None else a.out_dir)
    print(f"wrote {path}")
    for k in ("decode_tokens_per_s", "hf_generate_tokens_per_s", "roofline_fraction"):
        print(k, {b: round(v, 3) for b, v in result[k].items()})
    print("prefill_tokens_per_s", prefill_by_path, "mtp", mtp or mtp_skipped)
    return 0


def _prefill_rate(engine: Engine, prompts: list[list[int]], device: torch.device) -> float:
    """Prompt tokens/s of prefilling `prompts` (one output token each), after one warm-up run of
    the whole batch (prefix caching is off): a 1-prompt warm-up leaves the Triton compiles for the
    full step's token count (fused MoE and prefill configs are chosen by it) inside the timed run,
    the likely reason one H100 measured 40.6K prefill tok/s against 76.1K in an earlier run whose
    Triton cache was already filled (benchmarks/notes-engine.md)."""
    params = SamplingParams(temperature=0, max_tokens=1)
    engine.generate(prompts, params)
    sync(device)
    t = time.perf_counter()
    engine.generate(prompts, params)
    sync(device)
    return sum(len(p) for p in prompts) / (time.perf_counter() - t)


def _hf_baseline(model, cfg, a, g, device, dtype) -> dict[str, float]:
    """transformers' generate on the same weights, saved as an HF directory."""
    from transformers import AutoModelForCausalLM

    # The copy is removed once loaded, also when saving fails (a V3-width cut is tens of GB).
    with tempfile.TemporaryDirectory(prefix="moeray-bench-engine-") as hf_dir:
        save_model(model, cfg, hf_dir)
        # Any: transformers types `to` as @wraps(nn.Module.to) on the class, which mypy does not
        # bind (and lint environments without transformers see no type at all).
        hf: Any = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    hf = hf.to(device).eval()
    rates = {}
    for B in a.batch_sizes:
        if B > a.hf_max_batch:
            continue
        prompts = _random_prompts(g, cfg.vocab_size, B, a.prompt_len)
        rates[str(B)] = hf_decode(hf, prompts, min(a.decode_tokens, 16), device)
    return rates
