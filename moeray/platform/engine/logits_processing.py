"""Logits processing before sampling, batched on the device: one vectorized pass per step.

Legend: B rows, V vocabulary, L longest token history among the penalized rows, P pairs
(row, token) of a sparse update.

Order (vLLM's; the grammar's token mask, `sampler.mask_logits`, comes before all of it): logit_bias
(added) and min_tokens (eos and stop tokens set to -inf while a row has fewer
output tokens than its min_tokens; -inf wins over any bias, so these two commute), then the
repetition, frequency and presence penalties.
Everything but the penalties is a sparse scatter of (row, token) pairs built from the requests'
settings; the penalties scatter each penalized row's token ids (padded to L with an out-of-vocab
id V that lands in a dropped column) into a [B', V + 1] count matrix, B' the penalized rows only,
so rows without penalties cost nothing. No Python loop touches the vocabulary.

The result is fp32 and a new tensor (the caller's logits stay the model's raw ones, which logprobs
report).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from moeray.platform.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class History:
    """A row's tokens so far: the prompt and the output (for a speculative row, the output
    includes the drafts before it). Either may be a 1-D int64 tensor on the logits' device (the
    engine keeps the prompt's, so a long prompt is not uploaded every step)."""

    prompt: Sequence[int] | torch.Tensor
    output: Sequence[int] | torch.Tensor


def _scatter_value(
    logits_BV: torch.Tensor, pairs: list[tuple[int, int]], values: list[float] | float
) -> torch.Tensor:
    """logits with logits[r, t] replaced by value for each (r, t) pair (out of place)."""
    if not pairs:
        return logits_BV
    dev = logits_BV.device
    idx = torch.tensor(pairs, device=dev, dtype=torch.long)
    vals = torch.as_tensor(values, device=dev, dtype=logits_BV.dtype).expand(len(pairs))
    return logits_BV.index_put((idx[:, 0], idx[:, 1]), vals)


def _counts(
    rows: Sequence[Sequence[int] | torch.Tensor], V: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """[len(rows), V] occurrence counts of each row's token ids: the rows are padded with V into
    one [rows, L] id tensor (the lists in one upload) and scattered into V + 1 columns."""
    ids = [x if isinstance(x, torch.Tensor) else None for x in rows]
    lists = [i for i, x in enumerate(ids) if x is None]
    if lists:
        flat = torch.tensor([int(t) for i in lists for t in rows[i]], dtype=torch.long)
        chunks = flat.to(device).split([len(rows[i]) for i in lists])
        for i, chunk in zip(lists, chunks, strict=True):
            ids[i] = chunk
    padded = pad_sequence(
        [x.to(device=device, dtype=torch.long) for x in ids if x is not None],
        batch_first=True,
        padding_value=V,
    )
    counts = torch.zeros(len(rows), V + 1, device=device, dtype=dtype)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=dtype))
    return counts[:, :V]


def apply_penalties(
    logits_BV: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[History]
) -> torch.Tensor:
    """Repetition (prompt + output), frequency and presence (output) penalties on the rows that
    have them; the other rows are returned unchanged."""
    rows = [i for i, p in enumerate(params) if p.penalizes]
    if not rows:
        return logits_BV
    B, V = logits_BV.shape
    dev, dt = logits_BV.device, logits_BV.dtype
    sub = logits_BV[rows] if len(rows) < B else logits_BV
    out_counts = _counts([histories[i].output for i in rows], V, dev, dt)
    prompt_counts = _counts([histories[i].prompt for i in rows], V, dev, dt)
    rep = torch.tensor([params[i].repetition_penalty for i in rows], device=dev, dtype=dt)[:, None]
    freq = torch.tensor([params[i].frequency_penalty for i in rows], device=dev, dtype=dt)[:, None]
    pres = torch.tensor([params[i].presence_penalty for i in rows], device=dev, dtype=dt)[:, None]
    seen = (out_counts > 0) | (prompt_counts > 0)
    # Rows with r = 1 keep their logits exactly (x / 1 and x * 1 are exact); likewise a, f = 0.
    penalized = torch.where(sub > 0, sub / rep, sub * rep)
    sub = torch.where(seen, penalized, sub)
    sub = sub - freq * out_counts - pres * (out_counts > 0).to(dt)
    if len(rows) == B:
        return sub
    return logits_BV.index_copy(0, torch.tensor(rows, device=dev), sub)


def process_logits(
    logits_BV: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[History] | None,
    eos_token_ids: Collection[int] = (),
) -> torch.Tensor:
    """The logits sampling sees (fp32, a new tensor). `histories` may be None when no row has
    min_tokens or penalties."""
    B, V = logits_BV.shape
    if len(params) != B or (histories is not None and len(histories) != B):
        n_hist = None if histories is None else len(histories)
        raise ValueError(f"{B} rows, {len(params)} params, {n_hist} histories")
    logits = logits_BV.float()
    if not any(p.processes_logits for p in params):
        return logits if logits is not logits_BV else logits.clone()
    if histories is None and any(p.penalizes or p.min_tokens for p in params):
        raise ValueError("min_tokens and penalties need each row's token history")
    banned: list[tuple[int, int]] = []
    for r, p in enumerate(params):
        if p.min_tokens and histories is not None and len(histories[r].output) < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            banned.extend((r, t) for t in sorted(stops) if t < V)
    bias_pairs = [(r, t) for r, p in enumerate(params) for t, _ in p.logit_bias]
    bias_values = [b for p in params for _, b in p.logit_bias]
    if max((t for _, t in bias_pairs), default=-1) >= V:
        raise ValueError(f"logit_bias names token ids outside the vocabulary [0, {V})")
    if bias_pairs:
        idx = torch.tensor(bias_pairs, device=logits.device, dtype=torch.long)
        logits = logits.index_put(
            (idx[:, 0], idx[:, 1]),
            torch.tensor(bias_values, device=logits.device, dtype=logits.dtype),
            accumulate=True,
        )
    logits = _scatter_value(logits, banned, float("-inf"))
    if histories is not None:
        logits = apply_penalties(logits, params, histories)
    return logits if logits is not logits_BV else logits.clone()
