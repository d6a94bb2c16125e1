"""Per-request sampling settings: what a request asks of the sampler, validated.

The engine, the scheduler and the serving side all read these; `sampler` re-exports the class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from moeray.platform.engine.structured import StructuredOutput

MAX_LOGPROBS = 20  # top logprobs per token (OpenAI's chat limit, vLLM's default max_logprobs)
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values: [-100, 100]
MAX_PENALTY = 2.0  # OpenAI's range for presence/frequency penalties: [-2, 2]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (OpenAI names, and vLLM's for the extensions).

    temperature 0 means greedy (argmax, ties to the lowest token id, like transformers).
    top_k 0, top_p 1.0 and min_p 0.0 disable those filters. logprobs None returns none; n >= 0
    returns the sampled token's logprob plus the n most likely tokens'; prompt_logprobs the same
    for every prompt token after the first. stop strings end generation when they appear in the
    detokenized output (the stop string itself is not returned); stop_token_ids and the model's
    eos (unless ignore_eos) end it with that token returned.

    Logits processing (vLLM semantics; greedy applies it too, before the argmax):
      * min_tokens: eos and stop_token_ids are masked until that many tokens are out;
      * logit_bias: (token id, bias) pairs added to the logits (a Mapping is accepted);
      * repetition_penalty r: every token in the prompt or the output so far has its logit
        divided by r when positive, multiplied by r when negative (1.0 is off);
      * presence_penalty a, frequency_penalty f: a token seen c > 0 times in the output so far
        loses a + f * c (OpenAI's formula).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Grammar-constrained decoding (engine/grammar.py): the output must match this.
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and self.temperature < float("inf")):
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1] (0 disables it)")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens} must be in [0, max_tokens={self.max_tokens}]"
            )
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name}={k} must be None or in [0, {MAX_LOGPROBS}]")
        if not (self.repetition_penalty > 0.0 and self.repetition_penalty < float("inf")):
            raise ValueError(
                f"repetition_penalty={self.repetition_penalty} must be a finite number > 0 "
                "(1.0 disables it)"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -MAX_PENALTY <= v <= MAX_PENALTY:
                raise ValueError(f"{name}={v} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
        if isinstance(self.stop, str) or isinstance(self.stop_token_ids, int):
            raise ValueError("stop and stop_token_ids must be sequences, e.g. ('\\n',) and (2,)")
        if any(not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r}: empty stop strings are not accepted")
        stop_ids = tuple(int(t) for t in self.stop_token_ids)
        if any(t < 0 for t in stop_ids):
            raise ValueError(f"stop_token_ids={list(stop_ids)} must be token ids >= 0")
        bias = self.logit_bias
        pairs = sorted(bias.items() if isinstance(bias, Mapping) else bias)
        pairs = [(int(t), float(b)) for t, b in pairs]
        bad = [(t, b) for t, b in pairs if t < 0 or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS]
        if bad:
            raise ValueError(
                f"logit_bias entries {dict(bad[:5])} are invalid: token ids must be >= 0 and "
                f"biases in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
            )
        if self.structured is not None and self.ignore_eos:
            # The grammar ends with eos; past it the matcher allows nothing.
            raise ValueError("ignore_eos cannot be combined with structured output")
        if len({t for t, _ in pairs}) != len(pairs):
            raise ValueError(f"logit_bias={pairs}: a token id appears twice")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", stop_ids)
        object.__setattr__(self, "logit_bias", tuple(pairs))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalizes(self) -> bool:
        """The logits depend on the tokens so far (repetition, presence or frequency penalty)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def processes_logits(self) -> bool:
        """Anything changes the logits before sampling (see the class docstring)."""
        return self.penalizes or bool(self.logit_bias) or self.min_tokens > 0

    def max_token_id(self) -> int:
        """The largest token id the request names (stop_token_ids, logit_bias), -1 if none."""
        return max([*self.stop_token_ids, *(t for t, _ in self.logit_bias)], default=-1)
