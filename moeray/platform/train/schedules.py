"""Values that change during training (the job config's `schedule` section): the bias update speed
gamma and the MTP loss weight lambda, as the DeepSeek-V3 report schedules them (section 4.2):

    gamma   0.001 for the first 14.3T of 14.8T tokens, then 0.0   -> [[0.9662, 0.0]]
    lambda  0.3 for the first 10T tokens, then 0.1               -> [[0.6757, 0.1]]

Each schedule is a list of [fraction, value] breakpoints: from `fraction` of the run's tokens on,
the value is `value`; before the first breakpoint it is the job's constant (`gamma`,
`loss.mtp_lambda`). Every step trains on global_batch * seq_len tokens, so a fraction of the
tokens is the same fraction of the steps: step s (0-based) has seen s / steps of them and takes
the value of the last breakpoint with fraction <= s / steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

# (fraction of the run's tokens, value from there on)
Breakpoints = tuple[tuple[float, float], ...]


def _breakpoints(name: str, raw) -> Breakpoints:
    """`raw` as typed breakpoints; ValueError naming the bad entry and what is accepted."""
    try:
        points = tuple((float(f), float(v)) for f, v in raw)
    except (TypeError, ValueError):
        raise ValueError(
            f"schedule.{name}={raw!r} must be a list of [fraction, value] pairs, "
            f"e.g. [[0.9662, 0.0]]"
        ) from None
    last = 0.0
    for f, v in points:
        if not last < f <= 1.0:
            raise ValueError(
                f"schedule.{name}: fraction {f} must be in (0, 1] and greater than the one "
                f"before ({last}); fractions are of the run's tokens"
            )
        if v < 0 or not math.isfinite(v):
            raise ValueError(f"schedule.{name}: value {v} at fraction {f} must be finite and >= 0")
        last = f
    return points


def first_step(fraction: float, steps: int) -> int:
    """The first 0-based step that has seen at least `fraction` of a run of `steps` steps."""
    # round first: 0.3 * 10 is 3.0000000000000004 in floats, and step 3 has seen 30%
    return math.ceil(round(fraction * steps, 9))


@dataclass(frozen=True)
class ScheduleConfig:
    gamma: Breakpoints = ()  # the RouterActor applies it (routing/balance.GammaSchedule)
    mtp_lambda: Breakpoints = ()

    def __post_init__(self) -> None:
        for f in fields(self):  # YAML gives lists: keep the typed tuples
            object.__setattr__(self, f.name, _breakpoints(f.name, getattr(self, f.name)))

    def in_steps(self, name: str, steps: int) -> tuple[tuple[int, float], ...]:
        """Schedule `name` as (first step, value) pairs for a run of `steps` steps."""
        return tuple((first_step(f, steps), v) for f, v in getattr(self, name))

    def value(self, name: str, initial: float, step: int, steps: int) -> float:
        """Schedule `name`'s value at 0-based `step` of `steps`; `initial` before any breakpoint."""
        current = initial
        for start, v in self.in_steps(name, steps):
            if step >= start:
                current = v
        return current
