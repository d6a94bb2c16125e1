"""The model directory's generation_config.json as the API's default sampling, as vLLM does.

vLLM (by default, `--generation-config auto`) takes temperature, top_p, top_k, min_p,
repetition_penalty and max_new_tokens from that file and uses them for the fields a request leaves
unset; max_new_tokens becomes the default max_tokens. moeray takes all six. Its eos_token_id (an
id or a list; Kimi-K2's chat turns end with <|im_end|>, not config.json's EOS) also ends
generation, as vLLM adds those ids to every request's stop tokens (`eos_token_ids`). Other keys
(do_sample, max_length, ...) are not read, as in vLLM. DeepSeek-V3's file, for
example, sets temperature 0.6 and top_p 0.95.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moeray.platform.json_file import read_json_object
from moeray.platform.serve.http.protocol import SamplingDefaults

FILE = "generation_config.json"


def _number(data: dict[str, Any], key: str, path: Path, *, integer: bool) -> Any:
    value = data.get(key)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{path}: {key}={value!r} is invalid: expected {kind}")
    return value


def _read(path: Path) -> dict[str, Any] | None:
    return read_json_object(path) if path.exists() else None


def eos_token_ids(model_dir: str | Path) -> tuple[int, ...]:
    """The ids `<model_dir>/generation_config.json` names as eos_token_id (none without it).
    Raises ValueError naming the file and the bad value."""
    path = Path(model_dir) / FILE
    value = (_read(path) or {}).get("eos_token_id")
    ids = [value] if isinstance(value, int) else value
    if value is None:
        return ()
    if not isinstance(ids, list) or not all(type(t) is int and t >= 0 for t in ids):
        raise ValueError(
            f"{path}: eos_token_id={value!r} is invalid: expected a token id or a list of them"
        )
    return tuple(ids)


def sampling_defaults(model_dir: str | Path) -> SamplingDefaults:
    """The defaults `<model_dir>/generation_config.json` gives (none when there is no file).
    Raises ValueError naming the file and the bad value."""
    path = Path(model_dir) / FILE
    data = _read(path)
    if data is None:
        return SamplingDefaults()
    top_k = _number(data, "top_k", path, integer=True)
    if top_k is not None and top_k < -1:
        raise ValueError(f"{path}: top_k={top_k} is invalid: expected -1 or 0 (off), or >= 1")
    max_new = _number(data, "max_new_tokens", path, integer=True)
    if max_new is not None and max_new < 1:
        raise ValueError(f"{path}: max_new_tokens={max_new} is invalid: expected an integer >= 1")
    try:
        return SamplingDefaults(
            temperature=_number(data, "temperature", path, integer=False),
            top_p=_number(data, "top_p", path, integer=False),
            top_k=None if top_k is None else max(top_k, 0),  # vLLM's -1 is off, as 0 is
            max_tokens=max_new,
            min_p=_number(data, "min_p", path, integer=False),
            repetition_penalty=_number(data, "repetition_penalty", path, integer=False),
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
