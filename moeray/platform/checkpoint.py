"""HF-format checkpoints in and out: config.json, sharded safetensors + index, tokenizer files.

Key names follow the official DeepSeek-V3 release:
  model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight   (stacked [E, ...] in our modules)
  model.layers.N.mlp.gate.{weight,e_score_correction_bias}
  model.layers.{L+k}.{enorm,hnorm,eh_proj,shared_head.norm,<decoder block>}
      MTP depth k (L = layers)
  model.layers.{L+k}.{embed_tokens.weight,shared_head.head.weight}
      copies of the shared embedding and head, written for the official layout, checked on load
FP8 (`quantization_config.quant_method == "fp8"`): the projections of attention and of the dense,
shared and routed experts are e4m3 with `<name>.weight_scale_inv` per 128x128 block. They load
dequantized into the requested dtype, or with `keep_fp8=True` stay e4m3 (FP8Linear / FP8 experts).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeray.kernels.common import FP8_DTYPE
from moeray.platform.config import FP8_QUANTIZATION, ModelConfig
from moeray.platform.model.quant import (
    FP8Linear,
    dequantize_fp8_blocks,
    quantize_fp8_blocks,
    set_fp8_expert_weight,
)
from moeray.platform.model.rope import rope_frequencies
from moeray.platform.model.transformer import Transformer
from moeray.platform.tokenizer_dir import HF_TOKENIZER_FILES, tokenizer_files

INDEX = "model.safetensors.index.json"

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_HF_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")
# Weights the official release stores in FP8: every projection of attention and of the FFNs.
_FP8_WEIGHT = re.compile(
    r"(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj)"
    r"|mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj))\.weight$"
)


def stored_in_fp8(hf_key: str) -> bool:
    """Whether the official FP8 release stores this HF weight key as e4m3 + 128x128 scales."""
    return _FP8_WEIGHT.search(hf_key) is not None


def _to_hf_key(key: str, num_layers: int) -> str:
    m = _MTP.match(key)
    if not m:
        return key
    k, rest = int(m.group(1)), m.group(2)
    rest = rest[len("block.") :] if rest.startswith("block.") else rest
    return f"model.layers.{num_layers + k}.{rest}"


def _from_hf_key(key: str, num_layers: int) -> str:
    m = _HF_LAYER.match(key)
    if not m or int(m.group(1)) < num_layers:
        return key
    k, rest = int(m.group(1)) - num_layers, m.group(2)
    own = rest.startswith(_MTP_OWN)
    return f"mtp.{k}.{rest}" if own else f"mtp.{k}.block.{rest}"


def hf_state_dict(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor) for every weight in the official layout (experts split per expert)."""
    L = model.config.num_hidden_layers
    for key, t in model.state_dict().items():
        m = _EXPERT.match(key)
        if m:
            for e in range(t.shape[0]):
                yield _to_hf_key(f"{m.group(1)}.{e}.{m.group(2)}.weight", L), t[e]
        elif key.endswith("_scale_inv") and (m := _EXPERT.match(key[: -len("_scale_inv")])):
            for e in range(t.shape[0]):
                yield _to_hf_key(f"{m.group(1)}.{e}.{m.group(2)}.weight_scale_inv", L), t[e]
        else:
            yield _to_hf_key(key, L), t
    for k in range(len(model.mtp)):
        # Separate copies: safetensors refuses tensors that share storage within one file.
        yield (
            f"model.layers.{L + k}.embed_tokens.weight",
            model.model.embed_tokens.weight.detach().clone(),
        )
        yield f"model.layers.{L + k}.shared_head.head.weight", model.lm_head.weight.detach().clone()


def _save_tokenizer(tokenizer: Any, path: Path) -> None:
    if isinstance(tokenizer, (str, Path)):
        src = Path(tokenizer)
        files = [src] if src.is_file() else tokenizer_files(src)
        if not files:
            raise ValueError(
                f"no tokenizer files ({', '.join(HF_TOKENIZER_FILES)}, or tiktoken.model) at {src}"
            )
        for f in files:
            shutil.copy(f, path / f.name)
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(path))
    elif hasattr(tokenizer, "to_str"):  # a `tokenizers.Tokenizer`
        (path / "tokenizer.json").write_text(tokenizer.to_str())
        if not (path / "tokenizer_config.json").exists():
            (path / "tokenizer_config.json").write_text(
                json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n"
            )
    else:
        raise ValueError(
            f"tokenizer of type {type(tokenizer).__name__} is not supported: "
            "pass a directory, a tokenizer.json path, a tokenizers.Tokenizer or an HF tokenizer"
        )


def save_model(
    model: Transformer,
    config: ModelConfig,
    path: str | Path,
    *,
    tokenizer: Any = None,
    fp8: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 4 * 1024**3,
) -> Path:
    """Write an HF model directory. `fp8=True` stores the projections as e4m3 + 128x128 scales."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for key, t in hf_state_dict(model):
        t = t.detach().cpu()
        if t.dtype == FP8_DTYPE or key.endswith("_scale_inv"):
            tensors[key] = t.contiguous()
            continue
        if fp8 and stored_in_fp8(key):
            q, s = quantize_fp8_blocks(t)
            tensors[key] = q
            tensors[key[: -len("weight")] + "weight_scale_inv"] = s
            continue
        if (
            dtype is not None
            and t.is_floating_point()
            and not key.endswith("e_score_correction_bias")
        ):
            t = t.to(dtype)
        tensors[key] = t.contiguous()
    # Greedy sharding in key order, like transformers' `max_shard_size`.
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    for old in path.glob("model*.safetensors"):
        old.unlink()
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    hf = config.replace(
        quantization_config=dict(FP8_QUANTIZATION) if (fp8 or _has_fp8(model)) else None
    ).to_hf()
    param = next(model.parameters(), None)
    hf["torch_dtype"] = str(
        dtype or (param.dtype if param is not None else torch.float32)
    ).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if tokenizer is not None:
        _save_tokenizer(tokenizer, path)
    return path


def _has_fp8(model: nn.Module) -> bool:
    return any(t.dtype == FP8_DTYPE for t in model.state_dict().values())


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX).exists():
        try:
            index = json.loads((path / INDEX).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"{path / INDEX} is not a safetensors index (JSON with a weight_map): {e!r}"
            ) from None
        absent = [n for n in names if not (path / n).is_file()]
        if absent:
            raise ValueError(f"{path / INDEX} names weight files that are not in {path}: {absent}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"no safetensors weights in {path} (expected {INDEX} or model*.safetensors)"
        )
    return files


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def read_safetensors_header(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of a .safetensors file from its header alone: 8 bytes of header
    length (little-endian u64), then that many bytes of JSON. No tensor data is read; a file
    shorter than the data its header describes is refused as truncated."""
    size = file.stat().st_size
    with file.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise ValueError(
                f"{file} is not a safetensors file: {size} bytes, header length field {n}"
            )
        try:
            header = json.loads(f.read(n))
            out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
            end = 0
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    raise ValueError(
                        f"{file}: {key} has dtype {info['dtype']!r}: expected one of "
                        f"{sorted(_SAFETENSORS_DTYPES)}"
                    )
                out[key] = (
                    tuple(int(d) for d in info["shape"]),
                    _SAFETENSORS_DTYPES[info["dtype"]],
                )
                end = max(end, int(info["data_offsets"][1]))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError) as e:
            raise ValueError(f"{file} has an unreadable safetensors header: {e!r}") from None
    if 8 + n + end > size:
        raise ValueError(
            f"{file} is truncated: its header puts tensor data up to byte {8 + n + end}, "
            f"the file has {size}"
        )
    return out


@dataclass
class ReadStats:
    """What a load read from the safetensors files: tensor data only (headers not counted)."""

    tensors: int = 0
    bytes: int = 0


def _tensors(
    files: dict[Path, dict[str, tuple[tuple[int, ...], torch.dtype]]],
    header_only: bool,
    experts: frozenset[int] | None = None,
    stats: ReadStats | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint; `header_only`: meta tensors of the headers' shapes. With
    `experts`, routed-expert tensors of other experts are skipped unread: the files are
    memory-mapped (safe_open), so only the pages of the tensors taken are read."""
    from safetensors import safe_open

    for file, header in files.items():
        keys = [
            k for k in header if experts is None or (e := _expert_of(k)) is None or e in experts
        ]
        if header_only:
            for key in keys:
                shape, dt = header[key]
                yield key, torch.empty(shape, dtype=dt, device="meta")
            continue
        with safe_open(str(file), framework="pt") as f:
            for key in keys:
                t = f.get_tensor(key)
                if stats is not None:
                    stats.tensors += 1
                    stats.bytes += t.numel() * t.element_size()
                yield key, t


def _expert_of(hf_key: str) -> int | None:
    """The routed expert an HF key belongs to (its weight or block scale), else None."""
    key = hf_key.removesuffix("_scale_inv")
    m = _HF_EXPERT.match(key)
    return int(m.group(2)) if m else None


def keep_experts(model: Transformer, experts: list[int]) -> None:
    """Narrow every (meta) Experts module to the given global expert ids, contiguous and in
    order: the slice an expert-parallel rank holds."""
    E = model.config.n_routed_experts
    if not experts or experts != list(range(experts[0], experts[0] + len(experts))):
        raise ValueError(f"experts={experts}: expected a non-empty contiguous ascending range")
    if experts[0] < 0 or experts[-1] >= E:
        raise ValueError(f"experts={experts}: ids must be in [0, {E})")
    lo, hi = experts[0], experts[-1] + 1
    for moe in model.moe_layers():
        for name in ("gate_proj", "up_proj", "down_proj"):
            full = getattr(moe.experts, name)
            setattr(moe.experts, name, nn.Parameter(full[lo:hi], requires_grad=full.requires_grad))
        moe.experts.num_experts = hi - lo


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@dataclass
class _Matched:
    """A checkpoint's tensors matched to a (meta) model's state: what load_model materializes."""

    config: ModelConfig
    model: Transformer
    state: dict[str, torch.Tensor]
    fp8_linear: dict[str, tuple[torch.Tensor, torch.Tensor]]
    fp8_experts: dict[str, tuple[torch.Tensor, torch.Tensor]]
    shared_copies: dict[str, torch.Tensor]


def _match(
    path: Path,
    *,
    dtype: torch.dtype,
    keep_fp8: bool,
    header_only: bool,
    experts: list[int] | None = None,
    stats: ReadStats | None = None,
) -> _Matched:
    """Read config.json and the weights (or only their headers) and match them to the model
    (with `experts`, a model holding only those routed experts). Raises ValueError naming missing,
    unexpected or mis-shaped tensors."""
    config = ModelConfig.from_hf(path)
    files = {file: read_safetensors_header(file) for file in _weight_files(path)}
    L = config.num_hidden_layers
    missing_mtp = 0
    if config.num_nextn_predict_layers and not any(
        (m := _HF_LAYER.match(k)) and int(m.group(1)) >= L for h in files.values() for k in h
    ):
        # transformers' save_pretrained keeps `num_nextn_predict_layers` in config.json but writes
        # no model.layers.{L+k}.* (its model has no MTP); vLLM loads such a directory without MTP.
        missing_mtp = config.num_nextn_predict_layers
        warnings.warn(
            f"{path}: config.json sets num_nextn_predict_layers={missing_mtp} but the checkpoint "
            f"holds no MTP weights (model.layers.{L}.*); loading the model without MTP, so "
            "speculative decoding is unavailable",
            stacklevel=3,
        )
        config = config.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = Transformer(config)
    model.missing_mtp_layers = missing_mtp
    if experts is not None:
        keep_experts(model, experts)
    expert_ids = experts if experts is not None else list(range(config.n_routed_experts))
    expected = {k: v for k, v in model.state_dict().items()}
    loaded: dict[str, tuple[str, torch.Tensor]] = {}  # model key -> (HF key, tensor)
    by_expert: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}  # ... by expert
    scales: dict[str, torch.Tensor] = {}
    shared_copies: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    selected = None if experts is None else frozenset(experts)
    for hf_key, t in _tensors(files, header_only, selected, stats):
        m = _HF_LAYER.match(hf_key)
        if (
            m
            and int(m.group(1)) >= L
            and m.group(2) in ("embed_tokens.weight", "shared_head.head.weight")
        ):
            shared_copies[hf_key] = t
            continue
        if hf_key.endswith("weight_scale_inv"):
            scales[hf_key[: -len("_scale_inv")]] = t
            continue
        key = _from_hf_key(hf_key, L)
        me = _HF_EXPERT.match(key)
        if me:
            by_expert.setdefault(f"{me.group(1)}.{me.group(3)}", {})[int(me.group(2))] = (
                hf_key,
                t,
            )
        elif key in expected:
            loaded[key] = (hf_key, t)
        else:
            unexpected.append(hf_key)
    missing: list[str] = []
    mismatched: list[str] = []
    state: dict[str, torch.Tensor] = {}
    fp8_linear: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    fp8_experts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def resolve(hf_key: str, t: torch.Tensor, shape: torch.Size):
        """-> (tensor to load, fp8 pair or None); records shape errors."""
        if tuple(t.shape) != tuple(shape):
            mismatched.append(f"{hf_key}: checkpoint {tuple(t.shape)} vs model {tuple(shape)}")
            return None, None
        if t.dtype == FP8_DTYPE:
            s = scales.pop(hf_key, None)
            if s is None:
                missing.append(hf_key[: -len("weight")] + "weight_scale_inv")
                return None, None
            try:
                return dequantize_fp8_blocks(t, s, dtype), (t, s)
            except ValueError as e:
                mismatched.append(f"{hf_key[: -len('weight')]}weight_scale_inv: {e}")
                return None, None
        return t, None

    for key, ref in expected.items():
        m = _EXPERT.match(key)
        if m:
            per = by_expert.pop(key, {})
            absent = [e for e in expert_ids if e not in per]
            if absent:
                missing += [_to_hf_key(f"{m.group(1)}.{e}.{m.group(2)}.weight", L) for e in absent]
                continue
            parts, pairs = [], []
            for e in expert_ids:
                hf_key, t = per.pop(e)
                deq, pair = resolve(hf_key, t, ref.shape[1:])
                parts.append(deq)
                pairs.append(pair)
            unexpected += [hk for hk, _ in per.values()]
            if any(p is None for p in parts):
                continue
            state[key] = torch.stack(parts)
            if keep_fp8 and all(p is not None for p in pairs):
                fp8_experts[key] = (
                    torch.stack([p[0] for p in pairs]),
                    torch.stack([p[1] for p in pairs]),
                )
            continue
        if key not in loaded:
            missing.append(_to_hf_key(key, L))
            continue
        hf_key, t = loaded.pop(key)
        deq, pair = resolve(hf_key, t, ref.shape)
        if deq is None:
            continue
        state[key] = deq
        if keep_fp8 and pair is not None:
            fp8_linear[key[: -len(".weight")]] = pair
    unexpected += [hk for hk, _ in loaded.values()]
    unexpected += [hk for per in by_expert.values() for hk, _ in per.values()]
    unexpected += [k + "_scale_inv" for k in scales]
    problems = []
    for what, names, sep in (
        ("missing", sorted(missing), ", "),
        ("mismatched", mismatched, "; "),
        ("unexpected", sorted(unexpected), ", "),
    ):
        if names:
            shown = sep.join(names[:12]) + (
                f"{sep}... ({len(names) - 12} more)" if len(names) > 12 else ""
            )
            problems.append(f"{len(names)} {what} tensors: {shown}")
    if problems:
        raise ValueError(
            f"checkpoint {path} does not match its config.json: " + " | ".join(problems)
        )
    return _Matched(config, model, state, fp8_linear, fp8_experts, shared_copies)


def check_checkpoint(path: str | Path) -> tuple[ModelConfig, int]:
    """Check a model directory without reading tensor data: config.json parses into a
    ModelConfig and every tensor the model needs is in the safetensors files with its shape (FP8
    block scales included), read from the file headers. Returns the config the model loads with
    and the number of MTP depths config.json declares whose weights are absent (then loaded
    without MTP, see load_model); raises ValueError naming what is wrong."""
    matched = _match(Path(path), dtype=torch.float32, keep_fp8=False, header_only=True)
    return matched.config, matched.model.missing_mtp_layers


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    keep_fp8: bool = False,
    experts: list[int] | None = None,
    stats: ReadStats | None = None,
) -> tuple[ModelConfig, Transformer]:
    """Load an HF DeepSeek-V3 directory. Raises ValueError naming missing, unexpected or
    mis-shaped tensors. FP8 weights are dequantized to `dtype` unless `keep_fp8`.

    `experts` (global ids, a contiguous range): every MoE layer holds only those routed experts
    (an expert-parallel rank's shard, made expert-parallel from outside: parallel/serve_ep.py), and
    the other experts' tensors are never read. `stats` counts the tensor bytes read.

    A config.json with `num_nextn_predict_layers` >= 1 over a checkpoint without any MTP weights
    (what transformers' save_pretrained writes) loads without MTP, with one warning: the returned
    config has num_nextn_predict_layers=0 and `model.missing_mtp_layers` the declared depth."""
    path = Path(path)
    matched = _match(
        path, dtype=dtype, keep_fp8=keep_fp8, header_only=False, experts=experts, stats=stats
    )
    config, model, L = matched.config, matched.model, matched.config.num_hidden_layers
    model = model.to_empty(device=device)
    model.to(dtype)
    params = dict(model.named_parameters())
    for key, t in matched.state.items():
        target = model.get_parameter(key) if key in params else model.get_buffer(key)
        keep_dtype = key.endswith("e_score_correction_bias")
        target.data = t.to(device=device, dtype=torch.float32 if keep_dtype else dtype)
    # Non-persistent buffers are not in the checkpoint and were left uninitialized by to_empty.
    model.model.rotary_emb.inv_freq = rope_frequencies(config)[0].to(device)
    for k in range(len(model.mtp)):
        for name, main in (
            ("embed_tokens.weight", model.model.embed_tokens.weight),
            ("shared_head.head.weight", model.lm_head.weight),
        ):
            copy = matched.shared_copies.get(f"model.layers.{L + k}.{name}")
            if copy is not None and not torch.equal(copy.to(main.dtype).cpu(), main.detach().cpu()):
                warnings.warn(
                    f"model.layers.{L + k}.{name} differs from the main model's; "
                    "moeray's MTP shares the main embedding and head",
                    stacklevel=2,
                )
    for prefix, (q, s) in matched.fp8_linear.items():
        _set_submodule(model, prefix, FP8Linear(q.to(device), s.to(device)))
    for key, (q, s) in matched.fp8_experts.items():
        mod_name, _, proj = key.rpartition(".")
        set_fp8_expert_weight(model.get_submodule(mod_name), proj, q.to(device), s.to(device))
    model.eval()
    return config, model
