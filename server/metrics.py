"""A small Prometheus text-format registry: counters, a gauge and histograms."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

__all__ = ["Metrics", "timing_headers"]

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value
        self.n += 1

    def render(self, name: str, labels: str) -> list[str]:
        lines, cumulative = [], 0
        sep = "," if labels else ""
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {cumulative}')
        label_part = f"{{{labels}}}" if labels else ""
        lines += [f"{name}_sum{label_part} {self.total}", f"{name}_count{label_part} {self.n}"]
        return lines


class Metrics:
    """Thread-safe: the batching worker and the event loop both record."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.input_tokens: dict[str, int] = defaultdict(int)
        self.histograms: dict[tuple[str, str], _Histogram] = {}
        self.queue_depth = lambda: 0

    def _hist(self, name: str, labels: str, buckets: tuple[float, ...]) -> _Histogram:
        key = (name, labels)
        if key not in self.histograms:
            self.histograms[key] = _Histogram(buckets)
        return self.histograms[key]

    def request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            self._hist("toolkit_request_duration_seconds", f'route="{route}"', _SECONDS).observe(seconds)

    def phases(self, model: str, tokenize: float, queue: float, inference: float, tokens: int) -> None:
        with self._lock:
            self.input_tokens[model] += tokens
            for phase, value in (("tokenize", tokenize), ("queue", queue), ("inference", inference)):
                self._hist(f"toolkit_{phase}_duration_seconds", f'model="{model}"', _SECONDS).observe(value)

    def batch(self, model: str, size: int, tokens: int, seconds: float) -> None:
        with self._lock:
            labels = f'model="{model}"'
            self._hist("toolkit_batch_size", labels, _SIZES).observe(size)
            self._hist("toolkit_batch_tokens", labels, _TOKENS).observe(tokens)
            self._hist("toolkit_batch_duration_seconds", labels, _SECONDS).observe(seconds)

    def render(self) -> str:
        with self._lock:
            lines = ["# TYPE toolkit_requests_total counter"]
            lines += [f'toolkit_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.requests.items())]
            lines.append("# TYPE toolkit_request_errors_total counter")
            lines += [f'toolkit_request_errors_total{{route="{r}",status="{s}"}} {n}'
                      for (r, s), n in sorted(self.requests.items()) if s >= 400]
            lines.append("# TYPE toolkit_input_tokens_total counter")
            lines += [f'toolkit_input_tokens_total{{model="{m}"}} {n}' for m, n in sorted(self.input_tokens.items())]
            lines += ["# TYPE toolkit_queue_depth gauge", f"toolkit_queue_depth {self.queue_depth()}"]
            seen = set()
            for (name, labels), hist in sorted(self.histograms.items()):
                if name not in seen:
                    lines.append(f"# TYPE {name} histogram")
                    seen.add(name)
                lines += hist.render(name, labels)
            return "\n".join(lines) + "\n"


def timing_headers(t, started: float) -> dict[str, str]:
    """TEI-style timing headers (milliseconds) of a request's ``Timings``."""
    return {"x-total-time": f"{(time.perf_counter() - started) * 1e3:.2f}", "x-tokenization-time": f"{t.tokenize * 1e3:.2f}",
            "x-queue-time": f"{t.queue * 1e3:.2f}", "x-inference-time": f"{t.inference * 1e3:.2f}"}
