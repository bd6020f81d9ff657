"""The numpy samplers at the edges of what the API accepts, without the model."""

from __future__ import annotations

import numpy as np
import pytest

from tcserve.core.request import GREEDY_BELOW, SamplingParams
from tcserve.engines.llamacpp.sampling import Sampler


def logits(seed: int = 0, size: int = 4096) -> np.ndarray:  # type: ignore[type-arg]
    return np.random.default_rng(seed).normal(0, 4, size).astype(np.float32)


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-46, 1e-38, 1e-8, GREEDY_BELOW / 2])
@pytest.mark.parametrize("top_p", [None, 0.5])
def test_a_tiny_positive_temperature_is_greedy(temperature: float, top_p: float | None) -> None:
    row = logits()
    sampler = Sampler(SamplingParams(temperature=temperature, top_p=top_p, seed=1))
    assert [sampler(row) for _ in range(20)] == [int(np.argmax(row))] * 20


@pytest.mark.parametrize("temperature", [GREEDY_BELOW, 1e-4, 1e-3])
def test_small_temperatures_above_the_threshold_sample_without_nan(temperature: float) -> None:
    row = logits()
    best = int(np.argmax(row))
    row[best - 1] = row[best]  # a tie: both must be drawn, nothing else
    rng = np.random.default_rng(7)
    draws = {Sampler(SamplingParams(temperature=temperature), rng)(row) for _ in range(200)}
    assert draws == {best - 1, best}


def test_upstreams_are_sent_greedy_for_tiny_temperatures() -> None:
    assert SamplingParams(temperature=1e-300).greedy
    assert not SamplingParams(temperature=GREEDY_BELOW).greedy
