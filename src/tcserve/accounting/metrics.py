"""What /metrics shows, in Prometheus' terms: queue depth, running sequences,
tokens/s, speculative decoding's drafted and accepted tokens, time to first token,
the prompt and generated tokens of requests, and which models are loaded (loads, unloads, load seconds).

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
from collections import defaultdict, deque
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tcserve.core.engines import Engines
from tcserve.core.request import Usage

RATE_WINDOW = 10.0
SAMPLE_EVERY = 1.0
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self, engines: Engines) -> None:
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
        self._samples: defaultdict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self.registry.register(_EngineCollector(self))

    def observe_first_token(self, model: str, seconds: float) -> None:
        self.time_to_first_token.labels(model).observe(seconds)

    def count_tokens(self, model: str, usage: Usage) -> None:
        self._prompt_tokens.labels(model).inc(usage.input_tokens)
        self._generated_tokens.labels(model).inc(usage.output_tokens)

    def sample(self) -> None:
        now = time.monotonic()
        loaded = self._engines.by_name
        for name in set(self._samples) - set(loaded):
            del self._samples[name]  # unloaded: a reloaded engine counts from 0 again
        for name, engine in loaded.items():
            samples = self._samples[name]
            samples.append((now, engine.stats().generated_tokens))
            while samples and now - samples[0][0] > RATE_WINDOW:
                samples.popleft()

    def tokens_per_second(self, name: str) -> float:
        samples = self._samples.get(name)
        if samples is None or len(samples) < 2:
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

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        waiting = GaugeMetricFamily("tcserve_queue_depth", "Requests waiting for a slot.", labels=["model"])
        running = GaugeMetricFamily("tcserve_running_sequences", "Sequences being generated.", labels=["model"])
        rate = GaugeMetricFamily(
            "tcserve_tokens_per_second",
            f"Generated tokens/s over the last {RATE_WINDOW:.0f} s.",
            labels=["model"],
        )
        drafted = CounterMetricFamily(
            "tcserve_speculative_drafted_tokens",
            "Drafted tokens that speculative decoding verified (greedy requests on llama.cpp models).",
            labels=["model"],
        )
        accepted = CounterMetricFamily(
            "tcserve_speculative_accepted_tokens", "Of those drafted tokens, the ones the model agreed with.",
            labels=["model"],
        )  # fmt: skip
        engines = self._metrics._engines
        for name, engine in engines.by_name.items():
            stats = engine.stats()
            waiting.add_metric([name], stats.waiting)
            running.add_metric([name], stats.running)
            rate.add_metric([name], self._metrics.tokens_per_second(name))
            drafted.add_metric([name], stats.drafted_tokens)
            accepted.add_metric([name], stats.accepted_tokens)
        yield from (waiting, running, rate, drafted, accepted)
        yield from _load_metrics(engines)


def _load_metrics(engines: Engines) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Loading on demand (core/engines.py): what is loaded, how often and how long loads took."""
    loaded = GaugeMetricFamily("tcserve_model_loaded", "1 while the model is loaded and ready.", labels=["model"])
    loads = CounterMetricFamily("tcserve_model_loads", "Loads that succeeded.", labels=["model"])
    seconds = CounterMetricFamily("tcserve_model_load_seconds", "Seconds spent in loads that succeeded.",
                                  labels=["model"])  # fmt: skip
    unloads = CounterMetricFamily("tcserve_model_unloads", "Unloads, by reason (idle, evicted).",
                                  labels=["model", "reason"])  # fmt: skip
    for name, counts in engines.counts().items():
        loaded.add_metric([name], 1.0 if engines.state(name) == "ready" else 0.0)
        loads.add_metric([name], counts.loads)
        seconds.add_metric([name], counts.load_seconds)
        for reason in ("idle", "evicted"):
            unloads.add_metric([name, reason], counts.unloads.get(reason, 0))
    yield from (loaded, loads, seconds, unloads)
