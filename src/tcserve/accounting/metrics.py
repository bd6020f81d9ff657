"""What /metrics shows, in Prometheus' terms: queue depth, running sequences,
tokens/s, time to first token, and the prompt and generated tokens of requests.

Engine gauges are read from each engine's `stats()` when scraped; tokens/s is
the rate of the engines' own generated-token counters over the last
`RATE_WINDOW` seconds, sampled in the background, for dashboards that do not
compute `rate()`. The token counters are fed by the serving core with each
request's usage when it ends, so they agree with the ledger and the keys'
limits. The
registry belongs to the app (no global state), so several apps can live in
one process, as they do in the tests.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tcserve.core.request import Usage
from tcserve.engines.base import Engine

RATE_WINDOW = 10.0
SAMPLE_EVERY = 1.0
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self, engines: dict[str, Engine]) -> None:
        self.registry = CollectorRegistry()
        self.time_to_first_token = Histogram(
            "tcserve_time_to_first_token_seconds",
            "From the request's arrival to its first generated text (or its end).",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self._prompt_tokens = Counter(
            "tcserve_prompt_tokens", "Prompt tokens of requests that ended.", ["model"], registry=self.registry
        )
        self._generated_tokens = Counter(
            "tcserve_generated_tokens",
            "Tokens generated for requests that ended (as the ledger counts them).",
            ["model"],
            registry=self.registry,
        )
        self._engines = engines
        self._samples: dict[str, deque[tuple[float, int]]] = {name: deque() for name in engines}
        self.registry.register(_EngineCollector(self))

    def observe_first_token(self, model: str, seconds: float) -> None:
        self.time_to_first_token.labels(model).observe(seconds)

    def count_tokens(self, model: str, usage: Usage) -> None:
        self._prompt_tokens.labels(model).inc(usage.input_tokens)
        self._generated_tokens.labels(model).inc(usage.output_tokens)

    def sample(self) -> None:
        now = time.monotonic()
        for name, engine in self._engines.items():
            samples = self._samples[name]
            samples.append((now, engine.stats().generated_tokens))
            while samples and now - samples[0][0] > RATE_WINDOW:
                samples.popleft()

    def tokens_per_second(self, name: str) -> float:
        samples = self._samples[name]
        if len(samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = samples[0], samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    async def run_sampler(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_EVERY)


class _EngineCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        waiting = GaugeMetricFamily("tcserve_queue_depth", "Requests waiting for a slot.", labels=["model"])
        running = GaugeMetricFamily("tcserve_running_sequences", "Sequences being generated.", labels=["model"])
        rate = GaugeMetricFamily(
            "tcserve_tokens_per_second",
            f"Generated tokens/s over the last {RATE_WINDOW:.0f} s.",
            labels=["model"],
        )
        for name, engine in self._metrics._engines.items():
            stats = engine.stats()
            waiting.add_metric([name], stats.waiting)
            running.add_metric([name], stats.running)
            rate.add_metric([name], self._metrics.tokens_per_second(name))
        yield from (waiting, running, rate)
