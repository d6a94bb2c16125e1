"""Admission control: a bounded count of in-flight choices; over it the API answers 429."""

from __future__ import annotations

from dataclasses import dataclass, field

from moeray.platform.serve.http.errors import APIError, too_many_requests


@dataclass
class AdmissionGate:
    """Bounded in-flight counter: admits up to `limit` choices, else the API answers 429.

    Single event loop, no awaits between check and update, so no lock is needed.
    """

    limit: int
    retry_after_s: float = 1.0
    in_flight: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"admission limit {self.limit} must be >= 1")
        if not self.retry_after_s > 0:
            raise ValueError(f"retry_after_s {self.retry_after_s} must be > 0")

    def try_acquire(self, weight: int = 1) -> bool:
        if weight < 1:
            raise ValueError(f"weight {weight} must be >= 1")
        if self.in_flight + weight > self.limit:
            return False
        self.in_flight += weight
        return True

    def release(self, weight: int = 1) -> None:
        assert 0 < weight <= self.in_flight, (weight, self.in_flight)
        self.in_flight -= weight

    def rejection(self) -> APIError:
        return too_many_requests(
            f"Server busy: {self.in_flight} of {self.limit} request slots in use",
            self.retry_after_s,
        )
