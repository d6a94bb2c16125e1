"""The weights of one expert-parallel rank: its routed experts plus the replicated parts, from the
HF safetensors files (only those tensors read, memory-mapped) or random (`load_format="dummy"`).

Rank r of N holds the contiguous expert range [r*E/N, (r+1)*E/N), as `parallel/expert.py` shards
them. The model returned is plain (single-device code) with narrowed Experts modules: it must be
made expert-parallel (`parallel/serve_ep.py`) before it runs.
"""

from __future__ import annotations

import resource
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from moeray.platform.checkpoint import ReadStats, keep_experts, load_model
from moeray.platform.config import LOAD_FORMATS, ModelConfig
from moeray.platform.model.rope import rope_frequencies
from moeray.platform.model.transformer import Transformer
from moeray.platform.parallel.expert import expert_range


@dataclass(frozen=True)
class LoadReport:
    load_format: str
    experts: tuple[int, int]  # [lo, hi) global ids of the routed experts held
    bytes_read: int  # tensor data read from the safetensors files (0 for dummy)
    tensors_read: int
    param_bytes: int  # this rank's model weights as loaded
    peak_host_bytes: int  # the process's peak resident memory so far (ru_maxrss)
    seconds: float


def rank_experts(config: ModelConfig, ep_rank: int, ep_size: int) -> list[int]:
    """The global ids of the routed experts rank `ep_rank` of `ep_size` holds."""
    return list(expert_range(config.n_routed_experts, ep_rank, ep_size))


def dummy_model(
    config: ModelConfig,
    experts: list[int],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Transformer:
    """Random weights of the right shapes, made directly on `device` (as vLLM's
    `--load-format dummy`), for benchmarks of models whose weights are not here. The model is laid
    out on the meta device and only this rank's parameters are ever allocated. Replicated
    parameters get the same values on every rank (seeded by name), expert shards their own."""
    with torch.device("meta"):
        model = Transformer(config)
    keep_experts(model, experts)
    model = model.to_empty(device=device)
    model.to(dtype)
    std = config.initializer_range
    gen = torch.Generator(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            shard = f"@{experts[0]}" if name.rpartition(".")[0].endswith(".experts") else ""
            gen.manual_seed(seed * 1_000_003 + zlib.crc32(f"{name}{shard}".encode()))
            p.normal_(0.0, std, generator=gen)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.data = torch.zeros(
                config.n_routed_experts, dtype=torch.float32, device=device
            )
        model.model.rotary_emb.inv_freq = rope_frequencies(config)[0].to(device)
    return model.eval()


def load_rank_model(
    path: str | Path,
    ep_rank: int,
    ep_size: int,
    *,
    load_format: str = "safetensors",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    keep_fp8: bool = False,
) -> tuple[ModelConfig, Transformer, LoadReport]:
    """This rank's model from the HF directory `path` (config.json always; the safetensors files
    unless `load_format="dummy"`)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r}: accepted {LOAD_FORMATS}")
    t0 = time.perf_counter()
    stats = ReadStats()
    config = ModelConfig.from_hf(path)
    experts = rank_experts(config, ep_rank, ep_size)
    if load_format == "dummy":
        model = dummy_model(config, experts, device=device, dtype=dtype)
    else:
        config, model = load_model(
            path, device=device, dtype=dtype, keep_fp8=keep_fp8, experts=experts, stats=stats
        )
    param_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    report = LoadReport(
        load_format,
        (experts[0], experts[-1] + 1),
        stats.bytes,
        stats.tensors,
        param_bytes,
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        time.perf_counter() - t0,
    )
    return config, model, report
