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
from torch import nn

from moeray.kernels.common import FP8_DTYPE
from moeray.platform.checkpoint import (
    ReadStats,
    _to_hf_key,
    _weight_files,
    keep_experts,
    load_model,
    read_safetensors_header,
    stored_in_fp8,
)
from moeray.platform.config import LOAD_FORMATS, ModelConfig
from moeray.platform.model.moe import Experts, MoE
from moeray.platform.model.quant import (
    FP8Linear,
    dequantize_fp8_blocks,
    quantize_fp8_blocks,
    set_fp8_expert_weight,
)
from moeray.platform.model.rope import rope_frequencies
from moeray.platform.model.transformer import Transformer
from moeray.platform.parallel.expert import expert_range
from moeray.platform.parallel.serve_ep import ExpertStack, ExpertStacks


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
    fp8: bool = False,
) -> Transformer:
    """Random weights of the right shapes, made directly on `device` (as vLLM's
    `--load-format dummy`), for benchmarks of models whose weights are not here. The model is laid
    out on the meta device and only this rank's parameters are ever allocated. Replicated
    parameters get the same values on every rank (seeded by name), expert shards their own.

    `fp8`: the projections the official FP8 release stores as e4m3 + 128x128 block scales are
    made so (FP8Linear, FP8 experts: what `load_model(keep_fp8=True)` builds), filled one matrix
    at a time, so a rank never holds their bf16 form (DeepSeek-V3 on 8 GPUs fits only so)."""
    with torch.device("meta"):
        model = Transformer(config)
    keep_experts(model, experts)
    model.to(dtype)  # on meta, before the e4m3 parts (Module.to would upcast them)
    if fp8:
        _fp8_on_meta(model)
    model = model.to_empty(device=device)
    std = config.initializer_range
    gen = torch.Generator(device=device)
    with torch.no_grad():
        if fp8:
            _fill_fp8(model, std, seed, experts[0], gen)
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


def _fp8_on_meta(model: Transformer) -> None:
    """Swap the FP8 projections of a meta model for e4m3 + scale placeholders."""

    def blocks(n: int) -> int:
        return -(-n // 128)

    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and stored_in_fp8(f"{name}.weight"):
            N, K = m.weight.shape
            q = torch.empty(N, K, dtype=FP8_DTYPE, device="meta")
            parent, _, child = name.rpartition(".")
            fp8 = FP8Linear(q, torch.empty(blocks(N), blocks(K), device="meta"))
            setattr(model.get_submodule(parent) if parent else model, child, fp8)
        elif isinstance(m, Experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                E, N, K = getattr(m, proj).shape
                q = torch.empty(E, N, K, dtype=FP8_DTYPE, device="meta")
                set_fp8_expert_weight(
                    m, proj, q, torch.empty(E, blocks(N), blocks(K), device="meta")
                )


def _fill_fp8(model: Transformer, std: float, seed: int, first_expert: int, gen) -> None:
    """Random e4m3 weights with their block scales, quantized one matrix at a time from
    Normal(0, std) in bf16 (expert shards seeded by their first expert, the rest by name)."""
    dev = next(model.buffers()).device
    for name, m in model.named_modules():
        if isinstance(m, FP8Linear):
            targets = [(f"{name}.weight", m.weight, m.weight_scale_inv)]
        elif isinstance(m, Experts) and m.gate_proj.dtype == FP8_DTYPE:
            targets = [
                (f"{name}.{p}@{first_expert}", getattr(m, p), getattr(m, f"{p}_scale_inv"))
                for p in ("gate_proj", "up_proj", "down_proj")
            ]
        else:
            continue
        for key, q, scale in targets:
            gen.manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            for i in range(q.shape[0]) if q.dim() == 3 else [None]:
                shape = q.shape[-2:]
                w = torch.empty(shape, dtype=torch.bfloat16, device=dev).normal_(
                    0.0, std, generator=gen
                )
                wq, ws = quantize_fp8_blocks(w)
                (q if i is None else q[i]).copy_(wq)
                (scale if i is None else scale[i]).copy_(ws)


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
    unless `load_format="dummy"`). `keep_fp8`: an FP8 checkpoint's projections stay e4m3 (with
    dummy: random e4m3 ones)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r}: accepted {LOAD_FORMATS}")
    t0 = time.perf_counter()
    stats = ReadStats()
    config = ModelConfig.from_hf(path)
    experts = rank_experts(config, ep_rank, ep_size)
    if load_format == "dummy":
        model = dummy_model(config, experts, device=device, dtype=dtype, fp8=keep_fp8)
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


class CheckpointExperts:
    """Reads single routed experts from the HF safetensors files (memory-mapped, only the tensors
    asked for): the weight source of a serving rank that takes over experts it did not load when
    the expert placement changes (`parallel/serve_placement.py`). Built from the rank's model
    before it is made expert-parallel or after (the MoE layers keep their names). FP8-stored
    experts come as e4m3 with their block scales when `fp8` is asked (a rank that keeps FP8
    experts), else dequantized to `dtype`. `stats` counts the bytes read."""

    def __init__(self, path: str | Path, model: nn.Module, dtype: torch.dtype = torch.float32):
        path = Path(path)
        config = ModelConfig.from_hf(path)
        self.dtype = dtype
        self.stats = ReadStats()
        self._layers = [n for n, m in model.named_modules() if isinstance(m, MoE)]
        self._num_layers = config.num_hidden_layers
        self._file_of: dict[str, Path] = {}
        for f in _weight_files(path):
            for key in read_safetensors_header(f):
                self._file_of[key] = f

    def _key(self, layer: int, expert: int, proj: str) -> str:
        name = f"{self._layers[layer]}.experts.{expert}.{proj}.weight"
        return _to_hf_key(name, self._num_layers)

    def _read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self._file_of:
            raise ValueError(f"{key} is not in the checkpoint")
        with safe_open(str(self._file_of[key]), framework="pt") as f:
            t = f.get_tensor(key)
        self.stats.tensors += 1
        self.stats.bytes += t.numel() * t.element_size()
        return t

    def __call__(self, layer: int, experts: list[int], fp8: bool = False) -> ExpertStacks:
        if not 0 <= layer < len(self._layers):
            raise ValueError(f"MoE layer {layer}: the model has {len(self._layers)} MoE layers")
        out = []
        for proj in ("gate_proj", "up_proj", "down_proj"):
            rows, scales = [], []
            for e in experts:
                key = self._key(layer, e, proj)
                w = self._read(key)
                stored_fp8 = w.dtype == FP8_DTYPE
                if fp8 and not stored_fp8:
                    raise ValueError(f"{key} is stored as {w.dtype}, not FP8 (e4m3)")
                if fp8:
                    scales.append(self._read(key + "_scale_inv").float())
                elif stored_fp8:
                    w = dequantize_fp8_blocks(w, self._read(key + "_scale_inv"), self.dtype)
                rows.append(w if fp8 else w.to(self.dtype))
            out.append(ExpertStack(torch.stack(rows), torch.stack(scales) if fp8 else None))
        return out[0], out[1], out[2]
