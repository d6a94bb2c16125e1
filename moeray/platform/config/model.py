"""Model configuration with HF `config.json` field names, and presets (serving settings:
`serve.py`).

`ModelConfig.from_hf` reads the official DeepSeek-V3 `config.json` (which has `rope_scaling` and a
top-level `rope_theta`) as well as what transformers 5 writes (`rope_parameters`, which carries
`rope_theta` and `rope_type` inside). `to_hf` writes the official layout, which transformers reads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeray.platform.json_file import read_json_object

_ROPE_KEYS = (
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    # YaRN: {"rope_type": "yarn", "factor", "original_max_position_embeddings", "beta_fast",
    # "beta_slow", "mscale", "mscale_all_dim"}; None means plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    num_nextn_predict_layers: int = 1
    # {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
    #  "weight_block_size": [128, 128]} for FP8 checkpoints; None for bf16/fp32 ones.
    quantization_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        def bad(name: str, accepted: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r} is invalid: expected {accepted}")

        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
            "max_position_embeddings",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "a positive integer")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "an even number (RoPE rotates pairs)")
        if self.q_lora_rank is not None and (
            not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1
        ):
            raise bad("q_lora_rank", "a positive integer or null")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise bad("first_k_dense_replace", f"0..num_hidden_layers={self.num_hidden_layers}")
        if self.n_shared_experts < 0 or self.num_nextn_predict_layers < 0:
            raise ValueError(
                f"n_shared_experts={self.n_shared_experts} and num_nextn_predict_layers="
                f"{self.num_nextn_predict_layers} must be >= 0"
            )
        if self.n_routed_experts % self.n_group:
            raise bad("n_group", f"a divisor of n_routed_experts={self.n_routed_experts}")
        if self.topk_group > self.n_group:
            raise bad("topk_group", f"at most n_group={self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise bad(
                "num_experts_per_tok",
                f"at most topk_group*experts_per_group={self.topk_group * per_group}",
            )
        if self.scoring_func != "sigmoid":
            raise bad("scoring_func", "'sigmoid' (DeepSeek-V3's gate)")
        if self.topk_method != "noaux_tc":
            raise bad("topk_method", "'noaux_tc' (group-limited, bias-adjusted top-k)")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "'silu'")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("yarn", "default"):
                raise ValueError(
                    f"rope_scaling type {kind!r} is not supported: expected 'yarn' or 'default'"
                )
            if kind == "yarn":
                missing = [
                    k
                    for k in ("factor", "original_max_position_embeddings")
                    if k not in self.rope_scaling
                ]
                if missing:
                    raise ValueError(
                        f"rope_scaling is missing {missing} for YaRN: got {self.rope_scaling}"
                    )
        if self.quantization_config is not None:
            q = self.quantization_config
            if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
                raise ValueError(f"quantization_config={q} is not supported: expected fp8 e4m3")
            if list(q.get("weight_block_size", [128, 128])) != [128, 128]:
                raise ValueError(
                    f"weight_block_size={q.get('weight_block_size')} is not supported: "
                    "expected [128, 128]"
                )

    # ---- derived numbers -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_yarn(self) -> bool:
        return (
            self.rope_scaling is not None
            and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) == "yarn"
        )

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale^2 when mscale_all_dim is set (official code)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and self.is_yarn:
            mscale_all_dim = rs.get("mscale_all_dim", 0)
            factor = float(rs["factor"])
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale *= m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        """MTP blocks (layer_idx >= num_hidden_layers) are MoE like the last main layers."""
        return layer_idx >= self.first_k_dense_replace

    @property
    def kv_cache_bytes_per_token(self) -> int:
        """bf16 latent cache: (kv_lora_rank + qk_rope_head_dim) x 2 bytes per main layer."""
        return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * 2

    @property
    def attention_parameters(self) -> int:
        """One block's MLA projections, their latent norms and the block's two norms."""
        D, H = self.hidden_size, self.num_attention_heads
        q = (
            D * H * self.qk_head_dim
            if self.q_lora_rank is None
            else (D * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim)
        )
        return (
            q
            + D * (self.kv_lora_rank + self.qk_rope_head_dim)
            + self.kv_lora_rank
            + self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
            + H * self.v_head_dim * D
            + 2 * D
        )

    def num_parameters(self, *, activated: bool = False, include_mtp: bool = False) -> int:
        """Parameter count computed from the shapes (embedding and head counted once each)."""
        D = self.hidden_size
        attn = self.attention_parameters
        dense = 3 * D * self.intermediate_size
        expert = 3 * D * self.moe_intermediate_size
        n_exp = self.num_experts_per_tok if activated else self.n_routed_experts
        moe = (n_exp + self.n_shared_experts) * expert + self.n_routed_experts * D
        n_moe = self.num_hidden_layers - self.first_k_dense_replace
        total = self.first_k_dense_replace * (attn + dense) + n_moe * (attn + moe)
        total += 2 * self.vocab_size * D + D
        if include_mtp:
            total += self.num_nextn_predict_layers * (attn + moe + 2 * D * D + 3 * D)
        return total

    # ---- HF config.json --------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> ModelConfig:
        """Build from an HF model directory, a config.json path, or its parsed dict."""
        if isinstance(source, (str, Path)):
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            if not path.exists():
                raise ValueError(f"no config.json at {path}")
            data = read_json_object(path)
        else:
            data = dict(source)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {
            k: v for k, v in data.items() if k in names and k not in ("rope_scaling", "rope_theta")
        }
        rope = data.get("rope_parameters") or data.get("rope_scaling")
        theta = data.get("rope_theta")
        if rope:
            theta = rope.get("rope_theta", theta)
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind == "yarn":
                kwargs["rope_scaling"] = {
                    "rope_type": "yarn",
                    **{k: rope[k] for k in _ROPE_KEYS if k in rope},
                }
            elif kind != "default":
                raise ValueError(
                    f"rope type {kind!r} is not supported: expected 'yarn' or 'default'"
                )
        if theta is not None:
            kwargs["rope_theta"] = float(theta)
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The official `config.json` layout (transformers reads it into DeepseekV3Config)."""
        out: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "num_key_value_heads": self.num_attention_heads,
            "moe_layer_freq": 1,
            "rope_interleave": True,
            "use_cache": True,
        }
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "quantization_config" and value is None:
                continue
            out[f.name] = value
        if self.rope_scaling is not None:
            # "type" is what the official config and older readers use; "rope_type" what newer
            # ones do.
            out["rope_scaling"] = {
                "type": self.rope_scaling.get("rope_type", "yarn"),
                **self.rope_scaling,
            }
        return out

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# ---- presets ---------------------------------------------------------------------------------

FP8_QUANTIZATION = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


def deepseek_v3() -> ModelConfig:
    """The 671B DeepSeek-V3 numbers (docs/deepseek-v3.md, "Model config"): deepseek-ai/DeepSeek-V3's
    config.json, which DeepSeek-R1 shares (official FP8, MTP stored as layer 61)."""
    return ModelConfig(
        rope_scaling={
            "rope_type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        quantization_config=dict(FP8_QUANTIZATION),
    )


def small() -> ModelConfig:
    """About 0.85B parameters for one GPU, V3-shaped: the 512+64 latent and 128/64/128 heads of V3
    (so the MLA kernels apply unchanged), 64 experts in 8 groups with top-8 over 4 groups."""
    return ModelConfig(
        vocab_size=32768,
        hidden_size=1024,
        intermediate_size=2816,
        moe_intermediate_size=288,
        num_hidden_layers=12,
        first_k_dense_replace=1,
        num_attention_heads=16,
        q_lora_rank=384,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        max_position_embeddings=16384,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 4,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )


def tiny() -> ModelConfig:
    """Trains on 2 CPU cores in minutes; keeps every V3 feature on (MLA with q/kv LoRA, YaRN,
    a dense first layer, 16 experts in 4 groups with top-4 over 2 groups, a shared expert, MTP)."""
    return ModelConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=160,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        max_position_embeddings=1024,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 4,
            "original_max_position_embeddings": 256,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )


def moonlight_16b_a3b() -> ModelConfig:
    """moonshotai/Moonlight-16B-A3B's config.json: 27 layers of width 2048, no query LoRA
    (`q_lora_rank: null`), 64 experts in one group (`n_group: 1`) with top-6 and 2 shared experts,
    plain RoPE with theta 50000, no MTP. Fields not given here equal V3's in that file too."""
    return ModelConfig(
        vocab_size=163840,
        hidden_size=2048,
        intermediate_size=11264,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        first_k_dense_replace=1,
        num_attention_heads=16,
        q_lora_rank=None,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.446,
        max_position_embeddings=8192,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        bos_token_id=163584,
        eos_token_id=163585,
        num_nextn_predict_layers=0,
    )


def kimi_k2() -> ModelConfig:
    """moonshotai/Kimi-K2-Instruct's config.json: V3's shape with 384 experts in one group
    (`n_group: 1`), 64 heads, a dense first layer only, YaRN 32x over 4096 positions with
    beta_fast 1, FP8 weights, no MTP. Fields not given here equal V3's in that file too."""
    return ModelConfig(
        vocab_size=163840,
        first_k_dense_replace=1,
        num_attention_heads=64,
        n_routed_experts=384,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.827,
        max_position_embeddings=131072,
        rope_theta=50000.0,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        bos_token_id=163584,
        eos_token_id=163585,
        num_nextn_predict_layers=0,
        quantization_config=dict(FP8_QUANTIZATION),
    )


PRESETS = {
    "tiny": tiny,
    "small": small,
    "deepseek_v3": deepseek_v3,
    "moonlight_16b_a3b": moonlight_16b_a3b,
    "kimi_k2": kimi_k2,
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name]()
