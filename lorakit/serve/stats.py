"""What ``/metrics`` counts: requests, tokens, forward passes, time in grammar masks, and the recent generation
rate."""

from __future__ import annotations

import collections
import time


class Stats:
    """Counters since start, and the generation rate over the last ``window`` seconds."""

    def __init__(self, window: float = 10.0) -> None:
        self.started = time.time()
        self.window = window
        self.requests = self.finished = self.failed = self.cancelled = 0
        self.prompt_tokens = self.generated_tokens = 0
        self.forwards = self.mixed_forwards = self.largest_batch = 0
        self.grammar_seconds = 0.0  # computing and applying response_format masks, on the scheduler thread
        self._recent: collections.deque[float] = collections.deque()

    def count_token(self) -> None:
        self.generated_tokens += 1
        self._recent.append(time.monotonic())

    def count_step(self, adapters: int, rows: int) -> None:
        """A forward pass over ``rows`` rows that use ``adapters`` different adapters (the base counts as one)."""
        self.forwards += 1
        self.mixed_forwards += adapters > 1
        self.largest_batch = max(self.largest_batch, rows)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        while self._recent and self._recent[0] < now - self.window:
            self._recent.popleft()
        return len(self._recent) / self.window

    def as_dict(self) -> dict[str, float]:
        return {"requests_total": self.requests, "requests_finished_total": self.finished,
                "requests_failed_total": self.failed, "requests_cancelled_total": self.cancelled,
                "prompt_tokens_total": self.prompt_tokens, "generation_tokens_total": self.generated_tokens,
                "generation_tokens_per_second": round(self.tokens_per_second(), 2),
                "forward_passes_total": self.forwards,
                "mixed_adapter_forward_passes_total": self.mixed_forwards, "largest_batch": self.largest_batch,
                "grammar_mask_seconds_total": round(self.grammar_seconds, 4),
                "uptime_seconds": round(time.time() - self.started, 1)}
