"""Configuration: the model's (`model.py`: `ModelConfig` with HF `config.json` field names, and
the presets) and the serving application's (`serve.py`: `ServeConfig` and the values its choice
settings accept). Import from here: `from moeray.platform.config import ModelConfig, tiny`."""

from moeray.platform.config.model import (
    FP8_QUANTIZATION,
    PRESETS,
    ModelConfig,
    deepseek_v3,
    kimi_k2,
    moonlight_16b_a3b,
    preset,
    small,
    tiny,
)
from moeray.platform.config.serve import (
    DECODE_EXCHANGES,
    DEFAULT_DEMO_MODEL,
    DEFAULT_MAX_BODY_BYTES,
    KV_TRANSPORTS,
    LOAD_FORMATS,
    TOOL_CALL_PARSERS,
    ServeConfig,
)

__all__ = [
    "DECODE_EXCHANGES",
    "DEFAULT_DEMO_MODEL",
    "DEFAULT_MAX_BODY_BYTES",
    "FP8_QUANTIZATION",
    "KV_TRANSPORTS",
    "LOAD_FORMATS",
    "PRESETS",
    "TOOL_CALL_PARSERS",
    "ModelConfig",
    "ServeConfig",
    "deepseek_v3",
    "kimi_k2",
    "moonlight_16b_a3b",
    "preset",
    "small",
    "tiny",
]
