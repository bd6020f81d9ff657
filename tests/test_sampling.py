"""The samplers draw from exactly the distribution they claim (temperature, then top_k,
then top_p on the tempered distribution), checked with Pearson's chi-square test.

The exact distributions are computed here from scratch, in float64, with a full sort
and a plain cumulative cut, sharing nothing with `sampling.py`.

False-failure rate: each check rejects when the chi-square p-value is below
ALPHA = 1e-4, so a correct sampler would fail one check in 10,000 random seeds.
The seeds are fixed, so each test is deterministic: it passes or fails the same way
on every run and machine (numpy's PCG64 streams are stable across platforms).
Draws outside the exact support must never happen, whatever the seed.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from tcserve.core.request import GREEDY_BELOW, SamplingParams
from tcserve.engines.llamacpp.sampling import Sampler

ALPHA = 1e-4
DRAWS = 3000
"""Enough for the expected count of every kept token to be well above 5; few enough
that each test takes a fraction of a second."""

Probs = npt.NDArray[np.float64]

# Twelve tokens in no particular order (the samplers must not rely on sorted rows),
# logits spread so that no token is rarer than ~1% at the temperatures used below.
LOGITS = np.array([0.3, 1.2, -0.9, 0.0, 0.9, -0.3, 1.5, -1.2, 0.6, -0.6, 1.05, -0.1], dtype=np.float32)


# -- a chi-square test, without scipy ------------------------------------------------


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df): the regularized upper incomplete gamma Q(df/2, x/2)
    (a series below a + 1, a continued fraction above, as in Numerical Recipes' gammq)."""
    a, y = df / 2, x / 2
    if y <= 0:
        return 1.0
    scale = math.exp(-y + a * math.log(y) - math.lgamma(a))
    if y < a + 1:
        term = total = 1 / a
        n = a
        while term > 1e-17 * total:
            n += 1
            term *= y / n
            total += term
        return max(0.0, 1 - scale * total)
    tiny = 1e-300
    b, c, d = y + 1 - a, 1 / tiny, 1 / (y + 1 - a)
    fraction = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        fraction *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return scale * fraction


def p_value(draws: list[int], expected: Probs) -> float:
    """Pearson's chi-square test of the draws against `expected` over its support;
    any draw outside the support fails outright."""
    counts = np.bincount(np.asarray(draws), minlength=expected.size)
    support = expected > 0
    assert counts[~support].sum() == 0, f"drew tokens of zero probability: {np.flatnonzero(counts * ~support)}"
    wanted = expected[support] * len(draws)
    assert wanted.min() >= 5, "too few draws for the chi-square approximation"
    if support.sum() == 1:
        return 1.0
    statistic = float((((counts[support] - wanted) ** 2) / wanted).sum())
    return chi2_sf(statistic, int(support.sum()) - 1)


@pytest.mark.parametrize("x", [0.5, 3.0, 9.0, 20.0, 40.0])
def test_chi2_sf_matches_closed_forms(x: float) -> None:
    assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9)
    assert chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-9)
    assert chi2_sf(x, 6) == pytest.approx(math.exp(-x / 2) * (1 + x / 2 + (x / 2) ** 2 / 2), rel=1e-9)


def test_chi2_sf_at_the_threshold() -> None:
    # Tabulated 99.99% points: df 1 -> 15.137, df 10 -> 35.564.
    assert chi2_sf(15.137, 1) == pytest.approx(ALPHA, rel=1e-3)
    assert chi2_sf(35.564, 10) == pytest.approx(ALPHA, rel=1e-3)


# -- the exact distributions ---------------------------------------------------------


def exact(
    logits: npt.NDArray[np.float32], temperature: float, top_k: int | None = None, top_p: float | None = None
) -> Probs:
    """The distribution over the whole row: softmax(logits / T), cut to the k largest
    logits and renormalised, then to the smallest set of likeliest tokens whose mass
    reaches top_p, renormalised."""
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_k is not None:
        cut = np.zeros_like(probs)
        largest = np.argsort(-logits.astype(np.float64), kind="stable")[:top_k]
        cut[largest] = probs[largest]
        probs = cut / cut.sum()
    if top_p is not None:
        order = np.argsort(-probs, kind="stable")
        mass = np.cumsum(probs[order])
        assert np.abs(mass - top_p).min() > 1e-6, "a cut this close to top_p would test rounding, not sampling"
        kept = order[: int(np.argmax(mass >= top_p)) + 1]
        cut = np.zeros_like(probs)
        cut[kept] = probs[kept]
        probs = cut / cut.sum()
    return np.asarray(probs, dtype=np.float64)


def draw(params: SamplingParams, logits: npt.NDArray[np.float32], count: int = DRAWS) -> list[int]:
    sampler = Sampler(params)
    return [sampler(logits) for _ in range(count)]


# -- the samplers --------------------------------------------------------------------


@pytest.mark.parametrize(("temperature", "seed"), [(1.0, 1), (0.6, 2), (1.8, 3)])
def test_temperature_draws_from_the_tempered_softmax(temperature: float, seed: int) -> None:
    draws = draw(SamplingParams(temperature=temperature, seed=seed), LOGITS)
    assert p_value(draws, exact(LOGITS, temperature)) > ALPHA


@pytest.mark.parametrize(("top_k", "seed"), [(2, 4), (5, 5), (11, 6)])
def test_top_k_draws_from_the_k_likeliest_renormalised(top_k: int, seed: int) -> None:
    draws = draw(SamplingParams(temperature=1.0, top_k=top_k, seed=seed), LOGITS)
    assert p_value(draws, exact(LOGITS, 1.0, top_k=top_k)) > ALPHA


@pytest.mark.parametrize(("top_p", "seed"), [(0.3, 7), (0.62, 8), (0.9, 9)])
def test_top_p_draws_from_the_smallest_nucleus_that_reaches_p(top_p: float, seed: int) -> None:
    draws = draw(SamplingParams(temperature=1.0, top_p=top_p, seed=seed), LOGITS)
    assert p_value(draws, exact(LOGITS, 1.0, top_p=top_p)) > ALPHA


def test_temperature_top_k_and_top_p_apply_in_that_order() -> None:
    draws = draw(SamplingParams(temperature=0.7, top_k=5, top_p=0.8, seed=10), LOGITS)
    expected = exact(LOGITS, 0.7, top_k=5, top_p=0.8)
    # top_p on the renormalised top 5 keeps 4 tokens; on the whole tempered row (or
    # before top_k) it would keep 5, and the draws tell the two apart.
    unordered = exact(LOGITS, 0.7, top_p=0.8)
    assert (int(np.count_nonzero(expected)), int(np.count_nonzero(unordered))) == (4, 5)
    assert p_value(draws, expected) > ALPHA
    assert p_value(draws, unordered) < ALPHA


def test_a_nucleus_wider_than_the_first_guess_is_cut_exactly() -> None:
    """`_nucleus` first looks among the 64 likeliest tokens and widens the set when
    they hold less than top_p: here the nucleus has about a hundred tokens."""
    logits = np.random.default_rng(11).normal(0.0, 0.25, size=200).astype(np.float32)
    expected = exact(logits, 1.0, top_p=0.55)
    assert 64 < np.count_nonzero(expected) < 200
    assert p_value(draw(SamplingParams(temperature=1.0, top_p=0.55, seed=12), logits), expected) > ALPHA


# -- the checks can fail -------------------------------------------------------------


def test_the_check_rejects_a_neighbouring_distribution() -> None:
    """The same kind of draws, held against a slightly wrong distribution, are rejected:
    the chi-square check has the power to see a temperature of 0.8 instead of 1."""
    draws = draw(SamplingParams(temperature=0.8, seed=13), LOGITS)
    assert p_value(draws, exact(LOGITS, 0.8)) > ALPHA
    assert p_value(draws, exact(LOGITS, 1.0)) < ALPHA


def test_the_check_rejects_a_nucleus_one_token_too_large() -> None:
    draws = draw(SamplingParams(temperature=1.0, top_p=0.62, seed=14), LOGITS)
    right = exact(LOGITS, 1.0, top_p=0.62)
    kept = np.count_nonzero(right)
    wider = exact(LOGITS, 1.0)
    wider[np.argsort(-wider, kind="stable")[kept + 1 :]] = 0
    wider /= wider.sum()
    assert p_value(draws, right) > ALPHA
    assert p_value(draws, wider) < ALPHA


# -- tiny temperatures (the edges of what the API accepts) ------------------------------


def edge_logits(seed: int = 0, size: int = 4096) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).normal(0, 4, size).astype(np.float32)


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-46, 1e-38, 1e-8, GREEDY_BELOW / 2])
@pytest.mark.parametrize("top_p", [None, 0.5])
def test_a_tiny_positive_temperature_is_greedy(temperature: float, top_p: float | None) -> None:
    row = edge_logits()
    sampler = Sampler(SamplingParams(temperature=temperature, top_p=top_p, seed=1))
    assert [sampler(row) for _ in range(20)] == [int(np.argmax(row))] * 20


@pytest.mark.parametrize("temperature", [GREEDY_BELOW, 1e-4, 1e-3])
def test_small_temperatures_above_the_threshold_sample_without_nan(temperature: float) -> None:
    row = edge_logits()
    best = int(np.argmax(row))
    row[best - 1] = row[best]  # a tie: both must be drawn, nothing else
    rng = np.random.default_rng(7)
    draws = {Sampler(SamplingParams(temperature=temperature), rng)(row) for _ in range(200)}
    assert draws == {best - 1, best}


def test_upstreams_are_sent_greedy_for_tiny_temperatures() -> None:
    assert SamplingParams(temperature=1e-300).greedy
    assert not SamplingParams(temperature=GREEDY_BELOW).greedy
