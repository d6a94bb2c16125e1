"""MTP speculative decoding: the MTP module drafts the next-next token, the main model verifies.

Legend: J = 1 + k verified rows (the last known token, then the k drafts), V vocabulary, D width.

Drafting (DeepSeek-V3's single MTP depth). The MTP block at position i reads the main model's
hidden state at i and the embedding of token i+1, and predicts token i+2. It keeps its own latent
cache (layer index num_hidden_layers), so after every step it runs over exactly the positions whose
main-model KV just became valid, each with its now-known next token: a prefill chunk's positions,
or a decode's last token plus its accepted drafts. Its output at the last of them drafts the token
after the one just sampled. (A prefix-cache hit reuses the MTP latents of shared pages; the MTP
latent of a page's last position was computed with the original request's next token, which can
only lower the draft's acceptance, never change the verified output.)

More drafts (k > 1: vLLM's and SGLang's way of running DeepSeek-V3's one MTP module for several
tokens). With c = num_computed, the last known token sits at position c and draft 1 is token c + 1.
Draft j >= 2 (token c + j) is the MTP block run again at position c + j - 2 on the embedding of
draft j - 1 and, for the main model's hidden state there, which is not known yet, the MTP block's
own output hidden row at the position before (`draft_chain`). Those MTP latents at positions
c .. c + k - 2 are guesses; every one is rewritten with the exact inputs by the step after which
its position becomes valid (that step's MTP forward starts at the old c), before any forward at a
later position reads it, so they too can only lower acceptance. They are written into the
request's own pages (grown for them here, which the next step's verification needs anyway; where
no page is free a row gets the drafts its pages hold), never into the shared scratch page, since
the chain's later positions read them back.

One forward each per step. A decode step mixes rows of 1 + n verified tokens (n <= k drafts: fewer
where max_tokens or max_model_len is near), and MTP rows of 1 + accepted newly valid positions. The
runner pads the shorter rows of each to the longest (runner module docstring: the padded positions
are not valid yet, so their cache writes are dead and sit on owned or the scratch page, and their
outputs are cut off), so a pure-decode step is one main-model forward plus one MTP forward at any
batch size and acceptance, and k - 1 MTP forwards of one position a row for the further drafts.

Verification. The main model computes the last known token and the drafts in one forward (J = 1 + n
rows). Row j predicts the token after input j. Greedy: drafts are accepted while they equal the
argmax of the row before them, and the first mismatch (or the row after the last draft) gives one
more token, so the output is exactly plain greedy decoding. Sampling: drafts are the MTP argmax
(a one-hot draft distribution q), so the standard speculative rule reduces to: accept draft d with
probability p(d) under the target's filtered distribution p; on rejection sample from p with d
removed, renormalized. That leaves each emitted token distributed exactly as p.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from moeray.kernels.common import switched_on
from moeray.platform.engine.sampler import (
    Logprobs,
    SamplingParams,
    compute_logprobs,
    filtered_probs,
    sample_from_probs,
)


@dataclass
class SpecStats:
    num_verify_steps: int = 0  # sequence-steps that verified at least one draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # by draft position j (0: the first draft): drafts verified there, and accepted (a draft is
    # accepted only if those before it were, so acceptance by position falls with j)
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        """One sequence-step that verified `num_drafts` drafts and accepted the first
        `num_accepted` of them."""
        if not 0 <= num_accepted <= num_drafts:
            raise ValueError(f"{num_accepted} accepted of {num_drafts} drafts")
        if not num_drafts:
            return
        self.num_verify_steps += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        grow = num_drafts - len(self.drafted_per_position)
        if grow > 0:
            self.drafted_per_position += [0] * grow
            self.accepted_per_position += [0] * grow
        for j in range(num_drafts):
            self.drafted_per_position[j] += 1
            self.accepted_per_position[j] += j < num_accepted

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verifying step: 1 + accepted drafts (1.0 means no gain)."""
        if not self.num_verify_steps:
            return 0.0
        return 1.0 + self.num_accepted_tokens / self.num_verify_steps

    def as_dict(self) -> dict[str, float | list[int]]:
        return {
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "draft_tokens": self.num_draft_tokens,
            "accepted_tokens": self.num_accepted_tokens,
            "drafted_per_position": list(self.drafted_per_position),
            "accepted_per_position": list(self.accepted_per_position),
        }


def greedy_targets(logits: Sequence[torch.Tensor]) -> list[list[int]]:
    """Argmax of every row of each [J, V] logits tensor, read back in one device->host copy (one
    sync per step instead of one per verifying request)."""
    if not logits:
        return []
    flat = torch.cat([lg.argmax(-1) for lg in logits]).tolist()
    out, i = [], 0
    for lg in logits:
        out.append(flat[i : i + lg.shape[0]])
        i += lg.shape[0]
    return out


def greedy_accept(drafts: Sequence[int], target: Sequence[int]) -> list[int]:
    """Greedy verification: the drafts while each equals the target (argmax) of the row before
    it, then the target after the last accepted one: 1 to len(drafts) + 1 tokens, exactly what
    plain greedy decoding emits."""
    out: list[int] = []
    for j, d in enumerate(drafts):
        if d != target[j]:
            break
        out.append(d)
    out.append(target[len(out)])
    return out


def verdict_uniform(generator: torch.Generator | None) -> float:
    """The uniform that accepts or rejects a draft (`verify`: accepted where u < p(draft))."""
    return float(torch.rand((), generator=generator))


def token_uniform(generator: torch.Generator | None) -> torch.Tensor:
    """The uniform [1] that samples the token after the verdicts (`verify`: from the residual
    after a rejection, from the next row's distribution after the last accepted draft). A row
    of k drafts draws k `verdict_uniform`s then this, whatever the verdicts (spec_overlap.py
    draws them all at launch)."""
    return torch.rand((1,), generator=generator)


def verify(
    logits_JV: torch.Tensor,
    drafts: Sequence[int],
    params: SamplingParams,
    generator: torch.Generator,
    target: Sequence[int] | None = None,
    raw_logits_JV: torch.Tensor | None = None,
    num_verdicts: int = 0,
) -> tuple[list[int], list[Logprobs | None]]:
    """Accepted drafts then one more token, and their logprobs (see the module docstring).
    logits_JV: what the request samples from, i.e. the processed logits when it has min_tokens,
    logit_bias or penalties (row j processed with the drafts before it as output), so a draft is
    accepted exactly as plain decoding would sample it. raw_logits_JV: the model's logits, which
    logprobs report (default logits_JV). Greedy: `target` may carry logits_JV's row argmaxes
    already read back (`greedy_targets`). Sampled: the generator gives max(num_verdicts,
    len(drafts)) verdict uniforms, then the token's, whatever the verdicts (the drafter's k: a
    row's draws then do not depend on how many drafts its room allowed)."""
    J = logits_JV.shape[0]
    if J != len(drafts) + 1:
        raise ValueError(f"{J} logit rows for {len(drafts)} drafts: expected {len(drafts) + 1}")
    out: list[int] = []
    if params.greedy:
        if target is None:
            target = logits_JV.argmax(-1).tolist()
        elif len(target) != J:
            raise ValueError(f"{len(target)} greedy targets for {J} logit rows")
        out = greedy_accept(drafts, target)
    else:
        probs_JV = filtered_probs(logits_JV, [params] * J)
        us = [verdict_uniform(generator) for _ in range(max(num_verdicts, len(drafts)))]
        u_tok = token_uniform(generator).to(probs_JV.device)
        for j, d in enumerate(drafts):
            if us[j] < float(probs_JV[j, d]):
                out.append(d)
                continue
            residual = probs_JV[j].clone()
            residual[d] = 0.0
            total = residual.sum()
            if total <= 0:  # p was all on d: rejection had probability 0, keep d
                out.append(d)
                continue
            out.append(int(sample_from_probs((residual / total)[None], u_tok)[0]))
            break
        else:
            out.append(int(sample_from_probs(probs_JV[-1:], u_tok)[0]))
    if params.logprobs is None:  # skip the token upload when no logprobs are asked
        return out, [None] * len(out)
    rows = (logits_JV if raw_logits_JV is None else raw_logits_JV)[: len(out)]
    lps = compute_logprobs(rows, torch.tensor(out, device=rows.device), [params] * len(out))
    return out, lps


def draft_limit(req, max_model_len: int) -> int:
    """The most drafts a decoding request's step from start s may verify is this limit less s:
    its 1 + n tokens must not pass max_tokens (n <= max_tokens - outputs - 1) nor max_model_len
    (n <= max_model_len - length - 1), and with s = length - 1 both read as
    min(max_tokens + prompt length, max_model_len) - 2 - s. The limit holds for the whole
    request (start, outputs and length grow together), so a step launched before the one in
    flight is read back can still be cut on the device (spec_overlap.py)."""
    return min(req.params.max_tokens + len(req.prompt_token_ids), max_model_len) - 2


def no_mtp_reason(num_hidden_layers: int, missing_mtp_layers: int = 0) -> str:
    """Why speculative decoding is refused for a model without MTP modules."""
    if missing_mtp_layers:
        return (
            "speculative decoding (num_speculative_tokens=1) needs the MTP weights: the "
            f"checkpoint's config.json sets num_nextn_predict_layers={missing_mtp_layers} but it "
            f"holds no model.layers.{num_hidden_layers}.* tensors (transformers' save_pretrained "
            "drops them), so the model was loaded without MTP; use num_speculative_tokens=0 or a "
            "checkpoint with its MTP weights"
        )
    return (
        "speculative decoding (num_speculative_tokens=1) needs a model with MTP modules: this "
        "one has num_nextn_predict_layers=0"
    )


def require_mtp(model) -> None:
    """Raise a ValueError saying why `model` cannot draft when it has no MTP module."""
    if len(getattr(model, "mtp", [])) == 0:
        raise ValueError(
            no_mtp_reason(model.config.num_hidden_layers, getattr(model, "missing_mtp_layers", 0))
        )


class MTPDrafter:
    """Keeps the MTP layer's cache up to date and proposes up to `k` drafts per decoding request
    (the module docstring)."""

    def __init__(self, model, runner, num_speculative_tokens: int = 1) -> None:
        require_mtp(model)
        if num_speculative_tokens < 1:
            raise ValueError(
                f"num_speculative_tokens={num_speculative_tokens}: the MTP drafter proposes 1 or "
                "more tokens a step"
            )
        self.model = model
        self.runner = runner
        self.k = num_speculative_tokens
        self.stats = SpecStats()

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.stats.record(num_drafts, num_accepted)

    def chains(self, scheduled) -> bool:
        """Whether a synchronous step's MTP forward runs right after its main forward, before
        verifying (`chain`; opt-in, MOERAY_FUSED_MTP_CHAIN=1): a `chainable` step of a one-draft
        drafter."""
        return switched_on("MTP_CHAIN") and self.k == 1 and self.chainable(scheduled)

    def chainable(self, scheduled, *, sampled: bool = False, drafts: int = 1) -> bool:
        """Whether a step's MTP forward can run right after its main forward, on tokens still on
        the device: every row a decode of its last token and `drafts` drafts whose tokens are all
        that is read back (no logprobs, no logits processing), greedy (or with `sampled` sampled
        too: the verdict drawn on the device, spec_overlap.py), outside an expert-parallel
        gang."""
        if not scheduled or self.runner.gang is not None:
            return False
        return all(
            s.samples
            and s.num_tokens == 1 + drafts
            and len(s.spec_token_ids) == drafts
            and (sampled or s.request.params.greedy)
            and s.request.params.logprobs is None
            and not s.request.params.processes_logits
            for s in scheduled
        )

    def chain(self, scheduled, logits: Sequence[torch.Tensor], hidden: Sequence[torch.Tensor]):
        """A step `chains` allows: its greedy targets (the argmax of each row's 2 logit rows) and
        the MTP block's argmax at both verified positions of each row, read back in one
        device->host copy, where verifying first and then running the MTP forward
        (`propose`) takes two, with the host's verify and update between them. Why it is exact:
        the MTP inputs at positions start and start + 1 are the main model's hidden rows and the
        tokens after them, which are the targets whatever the verdict (an accepted draft equals
        target 0). Where the draft is rejected, position start + 1 is not valid: its MTP write
        is dead (the next step's MTP forward rewrites it first, as for a padded row; runner
        module docstring) and its argmax unused. -> ([target 0, target 1], [draft after
        position start, draft after start + 1]) per row; `assign` picks each row's draft."""
        targets_B2 = torch.stack(list(logits)).argmax(-1)
        items = [
            (s.request.request_id, s.start, h_SD, targets_B2[i])
            for i, (s, h_SD) in enumerate(zip(scheduled, hidden, strict=True))
        ]
        results = self.runner.execute_mtp(self.model.mtp[0], items)
        drafts_B2 = torch.stack([logits_SV for _h, logits_SV in results]).argmax(-1)
        host = torch.cat([targets_B2, drafts_B2], 1).tolist()  # the step's one sync
        return [r[:2] for r in host], [r[2:] for r in host]

    def assign(self, scheduled, drafts: Sequence[Sequence[int]], max_model_len: int) -> None:
        """After the scheduler's update of a `chain` step: each row's draft, the MTP argmax at
        its last newly valid position (1 + accepted drafts of them)."""
        reqs, picked = [], []
        for s, pair in zip(scheduled, drafts, strict=True):
            m = self._newly_valid(s, len(pair))
            if m is not None:
                reqs.append(s.request)
                picked.append([pair[m - 1]])
        self._set_drafts(reqs, picked, max_model_len)

    def assign_drafts(self, reqs, drafts: Sequence[Sequence[int]], max_model_len: int) -> None:
        """After a step resolved on the host (spec_overlap.py): each still running request's
        drafts, those its next step was fed, cut to what a synchronous step would verify."""
        running = [(r, d) for r, d in zip(reqs, drafts, strict=True) if r.status.value == "running"]
        self._set_drafts([r for r, _d in running], [d for _r, d in running], max_model_len)

    def propose(self, scheduled, hidden: Sequence[torch.Tensor], max_model_len: int) -> None:
        """After the scheduler's update: run the MTP block over each scheduled request's newly
        valid positions, then (k > 1) `draft_chain` for the further drafts, and set
        request.spec_token_ids for those now waiting to decode (`_set_drafts`)."""
        items, reqs = [], []
        for s, h_SD in zip(scheduled, hidden, strict=False):
            m = self._newly_valid(s, h_SD.shape[0])
            if m is None:
                continue
            req = s.request
            next_ids = req.token_ids[s.start + 1 : s.start + m + 1]
            assert len(next_ids) == m
            items.append((req.request_id, s.start, h_SD[:m], next_ids))
            reqs.append(req)
        if not items:
            return
        results = self.runner.execute_mtp(self.model.mtp[0], items)
        first_B = torch.stack([logits_SV[-1] for _h, logits_SV in results]).argmax(-1)
        counts = [self._room(req, max_model_len) for req in reqs]
        drafts_BK = self.draft_chain(reqs, first_B, [h_SD[-1:] for h_SD, _lg in results], counts)
        # Every request's drafts in one device->host copy (one sync per step, not per request).
        host = drafts_BK.tolist()
        self._set_drafts(
            reqs, [row[:n] for row, n in zip(host, counts, strict=True)], max_model_len
        )

    def draft_chain(
        self,
        reqs: Sequence,
        first_B: torch.Tensor,
        last_hidden: Sequence[torch.Tensor],
        counts: list[int],
    ) -> torch.Tensor:
        """The drafts after the first (module docstring): -> [B, k] int64 on the device, row b's
        first counts[b] entries its drafts (the rest 0). first_B: each request's first draft;
        last_hidden: its MTP output row [1, D] at position num_computed - 1. `counts` (each
        0..k) is lowered in place where a request's pages cannot grow to hold the chain's
        positions."""
        if self.k == 1:
            return first_B[:, None]  # (no launch for a chain there is none of)
        B = len(reqs)
        drafts_BK = torch.zeros(B, self.k, dtype=torch.long, device=first_B.device)
        drafts_BK[:, 0] = first_B
        kv = self.runner.kv
        for b, req in enumerate(reqs):
            c = req.num_computed
            # draft j's forward writes position c + j - 2: hold c + counts[b] - 1 tokens
            if counts[b] > 1 and not kv.grow(req.request_id, c + counts[b] - 1):
                held = len(kv.tables[req.request_id].pages) * kv.page_size
                counts[b] = max(1, min(counts[b], held - c + 1))
        hidden = list(last_hidden)
        for j in range(2, max(counts, default=0) + 1):
            rows = [b for b in range(B) if counts[b] >= j]
            items = [
                (
                    reqs[b].request_id,
                    reqs[b].num_computed + j - 2,
                    hidden[b],
                    drafts_BK[b, j - 2 : j - 1],
                )
                for b in rows
            ]
            results = self.runner.execute_mtp(self.model.mtp[0], items)
            new_R = torch.stack([logits_SV[-1] for _h, logits_SV in results]).argmax(-1)
            drafts_BK[:, j - 1].index_copy_(0, self.runner.inputs.device_index(rows), new_R)
            for b, (h_SD, _lg) in zip(rows, results, strict=True):
                hidden[b] = h_SD
        return drafts_BK

    @staticmethod
    def _newly_valid(s, most: int) -> int | None:
        """After the scheduler's update: how many positions of scheduled row `s` just became
        valid (a decode's 1 + accepted drafts, a chunk's tokens; 1 to `most`), or None where its
        request no longer runs."""
        req = s.request
        if req.status.value != "running":
            return None
        m = req.num_computed - s.start
        assert 1 <= m <= most, (req.request_id, m)
        return m

    def _room(self, req, max_model_len: int) -> int:
        """The drafts request `req` may verify at its next step: none unless it decodes next
        (its prompt done) without a grammar; else k, fewer where the step's 1 + n tokens would pass
        max_tokens or max_model_len."""
        if len(req.token_ids) - req.num_computed != 1:
            return 0
        # No drafts under a grammar: verifying a draft would need the matcher to accept it and
        # roll back on rejection (not done), and its mask for the bonus token.
        if req.params.structured is not None:
            return 0
        return max(0, min(self.k, draft_limit(req, max_model_len) - req.num_computed))

    def _set_drafts(self, reqs, drafts: Sequence[Sequence[int]], max_model_len: int) -> None:
        """request.spec_token_ids: its drafts, cut to what `_room` allows."""
        for req, row in zip(reqs, drafts, strict=True):
            req.spec_token_ids = list(row[: self._room(req, max_model_len)])
