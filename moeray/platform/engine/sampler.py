"""Sampling: logits processing, greedy, temperature, min-p, top-k, top-p, one random stream per
request, logprobs.

Legend: B rows (one per sequence being sampled), V vocabulary, k top-logprob count, W = ceil(V/32)
words of a packed token bitmask.

A row's logits go through its grammar's token mask (`mask_logits`, structured output) and
`logits_processing.process_logits` first (logit_bias, min_tokens, repetition/presence/frequency
penalties, all batched on the device), then greedy takes the argmax, and sampling applies
temperature, min-p, top-k and top-p, in vLLM's order.

Each request owns a torch.Generator seeded from its `seed` (or from the engine's generator when it
has none) and draws exactly one uniform number per sampled token, on the CPU. So a seeded request
gives the same tokens whatever else shares its batch, and whatever the device.
The token is found by inverse transform sampling over the filtered, renormalized probabilities in
vocabulary order: the first v whose cumulative probability exceeds u.

Drawing a token reads nothing back to the host: the per-row settings and the uniforms reach the
device through pinned, non-blocking copies (a plain `torch.tensor(..., device="cuda")` waits for
the stream), and the zero-probability fix-up of inverse transform sampling is a masked reduction,
not a host branch. So async scheduling can launch a sampled step before the previous one's ids
are read back (`Sampler.tokens`; engine/overlap.py).

Logprobs are those of the model's raw distribution (log_softmax of the logits, before temperature
and filtering), as vLLM reports by default: they measure the model, not the sampling settings.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from moeray.kernels.argmax import MAX_ROWS, argmax_rows, argmax_rows_applies
from moeray.kernels.common import switched_on
from moeray.platform.engine.logits_processing import History, process_logits
from moeray.platform.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Logprobs:
    """The sampled token's logprob and the top-n alternatives (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def make_generator(seed: int | None, fallback: torch.Generator) -> torch.Generator:
    """A request's CPU generator: from its seed, else from a draw of the engine's generator."""
    g = torch.Generator(device="cpu")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=fallback).item())
    g.manual_seed(int(seed))
    return g


def host_to(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device` without a stream sync: pinned and copied non-blocking on CUDA
    (the caching host allocator keeps the pinned buffer until the copy has run)."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`, without a stream sync (`host_to`)."""
    return host_to(torch.tensor(values, dtype=dtype), device)


def last_rows(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, V]: the last row of each of `logits` ([n_i, V] each), for the sampler to read (it
    writes nothing into them). Where they are tensors of one shape one stride apart in one
    storage, as a decode group's are (views of one forward's output, `ModelRunner.execute`), a
    view of their last rows: the torch.stack copy it saves is one more launch after each decode
    step's graph (B x V fp32: 0.66 MB a row at Moonlight's vocabulary). Else that copy. The check
    reads each tensor's shape and address only (at 256 rows 0.06 ms of host time on the CPU
    machine, a quarter of the stack's own)."""
    first = logits[0]
    shape, B = first.shape, len(logits)
    if first.dim() == 2 and first.stride(1) == 1 and all(t.shape == shape for t in logits):
        n, V = shape
        size = first.element_size()
        starts = [t.data_ptr() for t in logits]
        step = starts[1] - starts[0] if B > 1 else V * size
        offset = first.storage_offset() + (n - 1) * first.stride(0)  # the first last row
        end = (offset + (B - 1) * (step // size) + V) * size  # bytes the view spans
        if step >= V * size and step % size == 0 and end <= first.untyped_storage().nbytes():
            if starts == list(range(starts[0], starts[0] + step * B, step)):
                return first.as_strided((B, V), (step // size, 1), offset)
    return torch.stack([t[-1] for t in logits])


def filtered_probs(logits_BV: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, min-p, top-k and top-p, renormalized (fp32). Greedy rows
    become a one-hot on the argmax, so speculative verification can treat every row alike.
    `logits_BV` are the processed logits (`process_logits`) when the requests have any. The
    filters no row uses are skipped (`apply_filters` on the rows' settings)."""
    B, V = logits_BV.shape
    if len(params) != B:
        raise ValueError(f"{len(params)} sampling params for {B} rows")
    device = logits_BV.device
    temps = to_device(
        [p.temperature if not p.greedy else 1.0 for p in params], torch.float32, device
    )
    min_ps = [p.min_p for p in params]
    ks = [p.top_k if 0 < p.top_k < V else 0 for p in params]
    top_k = None
    if any(ks):
        idx = to_device([max(k, 1) - 1 for k in ks], torch.int64, device)
        top_k = (max(ks), idx, to_device([k > 0 for k in ks], torch.bool, device))
    top_ps = [p.top_p for p in params]
    greedy = [p.greedy for p in params]
    return apply_filters(
        logits_BV,
        temps,
        to_device(greedy, torch.bool, device) if any(greedy) else None,
        min_ps_B=to_device(min_ps, torch.float32, device) if any(min_ps) else None,
        top_k=top_k,
        top_ps_B=to_device(top_ps, torch.float32, device) if any(t < 1.0 for t in top_ps) else None,
    )


def apply_filters(
    logits_BV: torch.Tensor,
    temps_B: torch.Tensor,
    greedy_B: torch.Tensor | None,
    *,
    min_ps_B: torch.Tensor | None = None,
    top_k: tuple[int, torch.Tensor, torch.Tensor] | None = None,
    top_ps_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """`filtered_probs` on the device from each row's settings as tensors, nothing read back (a
    CUDA graph can capture it for one choice of the filters present): temps_B [B] (1.0 on greedy
    rows), greedy_B bool [B] (None: no greedy row), min_ps_B [B] (None: no row uses min-p),
    top_k (the largest k, each row's k - 1 [B] int64, whether each row uses it [B] bool; None: no
    row does), top_ps_B [B] (None: no row uses top-p). A row whose filter is off (min-p 0, top-k
    off, top-p 1) comes out as it would without the filter: a row's numbers do not depend on
    its batch-mates'."""
    logits = logits_BV.float() / temps_B[:, None]
    if min_ps_B is not None:
        # min-p: drop tokens below min_p x the top token's probability (after temperature)
        probs = logits.softmax(dim=-1)
        floor = min_ps_B[:, None] * probs.amax(-1, keepdim=True)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if top_k is not None:
        # top-k: keep values >= the k-th largest (ties at the boundary are kept, as transformers)
        kmax, idx_B, use_B = top_k
        kth = logits.topk(kmax, dim=-1).values.gather(1, idx_B[:, None])
        drop = use_B[:, None] & (logits < kth)
        logits = torch.where(drop, torch.full_like(logits, float("-inf")), logits)
    probs = logits.softmax(dim=-1)
    if top_ps_B is not None:
        # top-p: the smallest set of most likely tokens whose mass reaches p (always >= 1 token),
        # in the rows that ask for it only: a row at top_p = 1 whose fp32 running sum reaches 1.0
        # early would otherwise lose its tail tokens (~1,000 of 32,768 on random logits) and be
        # renormalized, its numbers depending on its batch-mates' settings
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        tp = top_ps_B[:, None]
        use = tp < 1.0
        drop_sorted = (mass_before >= tp) & use
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = torch.where(use, probs / probs.sum(-1, keepdim=True), probs)
    if greedy_B is not None:
        # greedy rows: a one-hot on the argmax of the logits as given
        onehot = torch.zeros_like(probs).scatter_(1, logits_BV.float().argmax(-1)[:, None], 1.0)
        probs = torch.where(greedy_B[:, None], onehot, probs)
    return probs


def draw_uniforms(generators: Sequence[torch.Generator], device) -> torch.Tensor:
    """One uniform in [0, 1) per row from each row's own generator (CPU draws, moved once without
    a stream sync)."""
    return host_to(torch.stack([torch.rand((), generator=g) for g in generators]), device)


def sample_from_probs(probs_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Inverse transform: the first token whose cumulative probability exceeds u (int64 [B])."""
    cdf = probs_BV.cumsum(-1)
    # Scale u by the total so fp32 rounding of the cumsum (total 1 +- 1e-6) never runs off the end.
    target = u_B.to(cdf.dtype)[:, None] * cdf[:, -1:]
    tok = torch.searchsorted(cdf, target, right=True).squeeze(1)
    tok = tok.clamp_(max=probs_BV.shape[-1] - 1)
    # A zero-probability token can only be picked through rounding at its edge (a cumsum whose
    # partial sums are associated differently on either side of it, or u x total rounding up to
    # the total).
    return step_back_to_mass(probs_BV, tok)


def step_back_to_mass(probs_BV: torch.Tensor, tok_B: torch.Tensor) -> torch.Tensor:
    """tok_B with each zero-probability pick moved to the last token with mass before it, else
    the row's first token with mass. A masked reduction over the row instead of a host branch,
    so nothing is read back."""
    V = probs_BV.shape[-1]
    has_mass_BV = probs_BV > 0
    bad_B = ~has_mass_BV.gather(1, tok_B[:, None]).squeeze(1)
    upto_BV = has_mass_BV & (torch.arange(V, device=probs_BV.device) <= tok_B[:, None])
    # argmax of a row of 0/1 bytes is its first 1: one byte a cell over [B, V] (a sampled step
    # runs this every time), where int64 positions would move eight.
    last_B = V - 1 - upto_BV.flip(-1).to(torch.uint8).argmax(-1)
    first_B = has_mass_BV.to(torch.uint8).argmax(-1)
    return torch.where(bad_B, torch.where(upto_BV.any(-1), last_B, first_B), tok_B)


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[Logprobs | None]


def compute_logprobs(
    logits_BV: torch.Tensor, tokens_B: torch.Tensor, params: Sequence[SamplingParams]
) -> list[Logprobs | None]:
    """Each row's token logprob and top-`logprobs` alternatives (None where not asked), from the
    raw logits."""
    return topk_logprobs(logits_BV, tokens_B, [p.logprobs for p in params])


def topk_logprobs(
    logits_BV: torch.Tensor, tokens_B: torch.Tensor, want: Sequence[int | None]
) -> list[Logprobs | None]:
    """log_softmax of each row at its token, plus its want[b] most likely tokens (None: skip)."""
    if all(w is None for w in want):
        return [None] * len(want)
    lp_BV = logits_BV.float().log_softmax(-1)
    n = max(w or 0 for w in want)
    top_v, top_i = lp_BV.topk(n, dim=-1) if n else (None, None)
    chosen = lp_BV.gather(1, tokens_B[:, None]).squeeze(1).tolist()
    out: list[Logprobs | None] = []
    for b, w in enumerate(want):
        if w is None:
            out.append(None)
            continue
        top: tuple[tuple[int, float], ...] = ()
        if w:
            assert top_i is not None and top_v is not None  # w > 0, so n > 0
            top = tuple(zip(top_i[b, :w].tolist(), top_v[b, :w].tolist(), strict=False))
        out.append(Logprobs(int(tokens_B[b]), float(chosen[b]), top))
    return out


def mask_logits(logits_BV: torch.Tensor, mask_BW: torch.Tensor) -> torch.Tensor:
    """Logits with the tokens a packed bitmask disallows set to -inf (a new tensor). Bit j of
    word w (int32) allows token 32 * w + j; columns past the mask's 32 * W are disallowed."""
    B, V = logits_BV.shape
    if mask_BW.shape[0] != B or mask_BW.dtype != torch.int32:
        raise ValueError(f"token mask {tuple(mask_BW.shape)} {mask_BW.dtype} for {B} rows")
    # Unpacked per byte (little-endian, as on x86 and CUDA: byte k of word w holds tokens
    # 32w+8k..32w+8k+7): a [B, 4W, 8] uint8 temporary, 4x smaller than per int32 word (33 MB at
    # B=256 over DeepSeek-V3's 129280 tokens).
    bytes_BY = mask_BW.to(logits_BV.device).contiguous().view(torch.uint8)
    bits = torch.arange(8, device=logits_BV.device, dtype=torch.uint8)
    allowed_BX = ((bytes_BY[:, :, None] >> bits) & 1).bool().flatten(1)
    allowed_BV = torch.zeros(B, V, dtype=torch.bool, device=logits_BV.device)
    n = min(V, allowed_BX.shape[1])
    allowed_BV[:, :n] = allowed_BX[:, :n]
    return logits_BV.masked_fill(~allowed_BV, float("-inf"))


class Sampler:
    """Samples one token per row. Holds the model's eos ids (min_tokens masks them) and, per
    device, the greedy argmax kernel's row counters; otherwise stateless apart from the
    per-request generators it is given."""

    def __init__(self, eos_token_ids: Collection[int] = ()) -> None:
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self._argmax_counters: dict[torch.device, torch.Tensor] = {}

    def greedy_ids(self, logits_BV: torch.Tensor) -> torch.Tensor:
        """logits_BV.argmax(-1) (int64 [B], ties to the lowest id): torch.argmax over an fp32 copy,
        or with MOERAY_FUSED_ARGMAX=1 kernels/argmax.py's one launch where it applies (a
        vocabulary's row in chunks over many SMs; every bf16/fp16 value is exactly an fp32 one, so
        it reads the logits as they are). Opt-in: alone it is 2.9-8x faster than copy + argmax,
        but an H200 engine A/B came out even (benchmarks/notes-engine.md)."""
        if not switched_on("ARGMAX") or not argmax_rows_applies(logits_BV):
            return logits_BV.float().argmax(-1)
        counters = self._argmax_counters.get(logits_BV.device)
        if counters is None:  # zero; every launch leaves it zero
            counters = torch.zeros(MAX_ROWS, dtype=torch.int32, device=logits_BV.device)
            self._argmax_counters[logits_BV.device] = counters
        return argmax_rows(logits_BV, counters)

    def process(
        self,
        logits_BV: torch.Tensor,
        params: Sequence[SamplingParams],
        histories: Sequence[History] | None = None,
    ) -> torch.Tensor:
        """The logits the requests sample from (see logits_processing)."""
        return process_logits(logits_BV, params, histories, self.eos_token_ids)

    def __call__(
        self,
        logits_BV: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator],
        histories: Sequence[History] | None = None,
        token_mask_BW: torch.Tensor | None = None,
    ) -> SampleResult:
        """histories: each row's tokens so far, needed when a row has min_tokens or penalties.
        token_mask_BW: which tokens each row may take (packed bits, `mask_logits`), applied
        first."""
        tokens = self.tokens(logits_BV, params, generators, histories, token_mask_BW)
        return SampleResult(tokens.tolist(), compute_logprobs(logits_BV, tokens, params))

    def tokens(
        self,
        logits_BV: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator],
        histories: Sequence[History] | None = None,
        token_mask_BW: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The sampled ids [B] (int64) on the logits' device, without reading them back (async
        scheduling feeds them to the next step on the device); arguments as `__call__`."""
        B = logits_BV.shape[0]
        if not (len(params) == len(generators) == B):
            raise ValueError(f"{B} rows, {len(params)} params, {len(generators)} generators")
        if token_mask_BW is not None:
            logits_BV = mask_logits(logits_BV, token_mask_BW)
        if any(p.processes_logits for p in params):
            logits_BV = self.process(logits_BV, params, histories)
        tokens = self.greedy_ids(logits_BV)
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            rows = to_device(sampled_rows, torch.int64, logits_BV.device)
            sub = [params[i] for i in sampled_rows]
            probs = filtered_probs(logits_BV[rows], sub)
            u = draw_uniforms([generators[i] for i in sampled_rows], logits_BV.device)
            tokens[rows] = sample_from_probs(probs, u)
        return tokens
