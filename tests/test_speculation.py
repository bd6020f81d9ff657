"""Speculative decoding from n-grams (engines/llamacpp/speculation.py) in the scheduler,
on the fake model: the text is exactly the plain greedy text, drafts are verified and
trimmed, and the step costs decide whether to speculate.

The fake model's next token is a function of its sequence's whole cache, so a draft
token left in the cache by mistake, or a trim at the wrong position, changes the text
against `reference`, which computes it without the scheduler.
"""

from __future__ import annotations

import random

import pytest

from fake_model import EOS, hashed, replying, tokens_of
from tcserve.core.request import SamplingParams
from tcserve.engines.llamacpp.chunks import CPU_LOOSE
from tcserve.engines.llamacpp.scheduler import CATCH_UP_AFTER, FEWEST_DRAFT_ROWS
from tcserve.engines.llamacpp.speculation import (
    CALIBRATION_ROWS,
    MAX_DRAFT,
    Acceptance,
    NgramDrafts,
    StepCosts,
    plan_drafts,
    ubatches,
)
from test_scheduler import MARKER, Harness, reference

PASSAGE = "the quick brown fox jumps over the lazy dog and runs into the woods"
EDITED = "the quick brown cat jumps over the lazy dog and runs into the woods"
QUOTE = f"Text: {PASSAGE}\nQuote it with one word changed. A:"


def flat(rows: int) -> float:
    """A memory-bound step: a few more rows cost almost nothing."""
    return 0.015 + 0.0001 * rows


def linear(rows: int) -> float:
    """A compute-bound step: every row costs the same, beside a small fixed cost."""
    return 0.002 + 0.004 * rows


def drafted_rows(harness: Harness, slot: int, prompt: int) -> list[int]:
    """How many rows of `slot` each decode of generated tokens carried (after a `prompt`-token prefill)."""
    counts = [sum(1 for e in batch if e.slot == slot and e.position >= prompt) for batch in harness.model.decoded]
    return [count for count in counts if count]


# -- the drafts ---------------------------------------------------------------------------


def test_a_draft_is_what_followed_the_latest_longest_match() -> None:
    drafts = NgramDrafts([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    assert drafts.propose(3) == [7, 8, 5]  # "2 3" last ended before 7 (the longer "5 2 3" never occurred)
    drafts.extend([7])
    # "2 3 7" last ended before 8, five tokens back: the text repeats with period 5.
    assert drafts.propose(8) == [8, 5, 2, 3, 7, 8, 5, 2]
    assert drafts.propose(0) == []


def test_a_suffix_seen_only_once_proposes_nothing() -> None:
    drafts = NgramDrafts([4, 5, 6])
    assert drafts.propose(4) == []
    drafts.extend([4, 5])
    assert drafts.propose(4) == [6, 4, 5, 6]
    drafts.extend([0, 0, 0])
    assert drafts.propose(3) == [0, 0, 0]  # a loop of one token: "0 0" ended one token back


WORDS: dict[str, int] = {}


def ids(text: str) -> list[int]:
    """One token a word ("=" and ":" too), the same id for the same word (`WORDS`)."""
    return [WORDS.setdefault(word, len(WORDS)) for word in text.split()]


RECORD = ids("a1 a2 = a3 ; b1 b2 = b3 ; c1 c2 = c3 ; d1 d2 = d3 ; e1 e2 = e3 ; end")


def test_a_draft_goes_on_after_a_token_the_model_replaced() -> None:
    drafts = NgramDrafts([*RECORD, *ids("a1 a2 :")])  # "a2 :" never occurred
    assert drafts.propose(4) == ids("a3 ; b1 b2")  # ":" took the place of "="
    drafts = NgramDrafts([*RECORD, *ids("a1 a2 a3")])  # "a2 a3" never occurred either
    assert drafts.propose(2) == ids("; b1")  # "a3" came right after "a2", "=" left out
    assert NgramDrafts(ids("x y z")).propose(2) == []  # "x y" never occurred before


def test_a_replacement_the_model_made_twice_is_made_in_later_drafts_until_it_is_not() -> None:
    drafts = NgramDrafts([*RECORD, *ids("a1 a2 :")])
    assert drafts.propose(6) == ids("a3 ; b1 b2 = b3")
    drafts.extend(ids("a3 ; b1 b2 :"))  # once: not yet a habit
    assert drafts.propose(6) == ids("b3 ; c1 c2 = c3")
    drafts.extend(ids("b3 ; c1 c2 :"))  # twice
    assert drafts.propose(6) == ids("c3 ; d1 d2 : d3")
    drafts.extend(ids("c3 ; d1 d2 ="))  # the model kept "=" this time
    drafts.extend(ids("d3 ; e1 e2"))
    assert drafts.propose(2) == ids("= e3")


# -- the decision -------------------------------------------------------------------------


def test_a_run_of_right_guesses_makes_the_next_drafted_tokens_likelier_and_a_miss_ends_it() -> None:
    acceptance = Acceptance()
    fresh = acceptance.chances(4)
    assert fresh == sorted(fresh, reverse=True) and fresh[0] == pytest.approx(0.5)  # the Beta(1, 1) rate
    acceptance.record(6, 6)  # a whole draft was right
    running = acceptance.chances(4)
    assert acceptance.run == 6 and running[0] > acceptance.rate > fresh[0]
    acceptance.record(8, 8)
    assert acceptance.chances(4)[3] > running[3]  # a longer run: likelier still
    acceptance.record(2, 3)  # a miss after two right ones
    assert acceptance.run == 0
    assert acceptance.chances(1) == [pytest.approx(acceptance.rate)]  # back to the rate so far
    acceptance.learn(proposed=5, verified=3, right=4)  # all three drafted tokens right
    assert acceptance.run == 3
    acceptance.learn(proposed=5, verified=0, right=1)  # not drafted: its first token is checked
    assert acceptance.run == 4 and (acceptance.accepted, acceptance.tried) == (20, 21)
    acceptance.learn(proposed=0, verified=0, right=0)  # a step with no lookup: the text left what was copied
    assert acceptance.run == 0 and (acceptance.accepted, acceptance.tried) == (20, 21)
    acceptance.learn(proposed=5, verified=4, right=1)  # a miss at the second drafted token
    assert acceptance.run == 0 and (acceptance.accepted, acceptance.tried) == (21, 23)


def test_a_sequence_whose_lookups_keep_missing_drafts_nothing() -> None:
    costs = StepCosts()
    costs.calibrate({1: 0.026, 4: 0.044, 8: 0.075, 12: 0.101, 16: 0.126})  # measured on Gemma 3 270M
    missing, copying = Acceptance(), Acceptance()
    for _ in range(10):
        missing.record(0, 1)
        copying.record(1, 1)
    assert plan_drafts([0], [missing.chances(15)], costs, room=15) == [0]
    assert plan_drafts([0], [copying.chances(15)], costs, room=15) == [15]  # 16 rows: the cheapest a token


def steady(available: int, rate: float) -> list[float]:
    """The chances of `available` drafted tokens, each right with probability `rate`."""
    return [rate**j for j in range(1, available + 1)]


def measured(cost: object, rows: range) -> StepCosts:
    costs = StepCosts()
    for count in rows:
        costs.record(count, 1, cost(count))  # type: ignore[operator]
    return costs


def test_a_memory_bound_step_takes_every_likely_draft_token_within_the_room() -> None:
    costs = measured(flat, range(1, 40))
    assert plan_drafts([0], [steady(16, 0.9)], costs, room=100) == [16]
    assert plan_drafts([0], [steady(16, 0.9)], costs, room=5) == [5]
    assert sum(plan_drafts([0, 1], [steady(16, 0.9), steady(16, 0.9)], costs, room=20)) == 20


def test_a_compute_bound_step_takes_no_draft_unless_it_is_nearly_sure() -> None:
    costs = measured(linear, range(1, 60))
    assert plan_drafts(list(range(16)), [steady(8, 0.5)] * 16, costs, room=100) == [0] * 16
    # A draft token right 99% of the time adds 0.99 tokens for one row's price: worth it.
    assert plan_drafts([0], [steady(1, 0.99)], costs, room=100) == [1]


def test_likelier_drafts_go_first_and_nothing_is_planned_before_a_step_was_measured() -> None:
    costs = measured(lambda rows: 0.015 + 0.002 * rows, range(1, 40))
    assert plan_drafts([0], [steady(8, 0.95)], costs, room=100) > plan_drafts([0], [steady(8, 0.3)], costs, room=100)
    assert plan_drafts([3], [steady(8, 0.9)], StepCosts(), room=100) == [0]


def test_a_larger_step_than_any_measured_costs_what_the_largest_rows_cost_each() -> None:
    costs = measured(linear, range(1, 3))
    assert costs.predict(40) == pytest.approx(linear(40))
    assert plan_drafts(list(range(16)), [steady(8, 0.5)] * 16, costs, room=100) == [0] * 16
    costs.record(3, 1, linear(1))  # a noisy reading: the line never falls
    assert costs.predict(40) == pytest.approx(linear(1))
    assert measured(linear, range(1, 2)).predict(40) == linear(1)  # one figure: nothing to extend


def test_passes_of_several_sequences_are_learned_apart_from_a_lone_sequence_s_calibrated_ones() -> None:
    costs = StepCosts()
    costs.calibrate({1: 0.018, 4: 0.030, 9: 0.058})  # 5 ms a row from 1 to 9
    costs.record(4, 1, 0.100)  # a lone sequence's calibrated figures stay
    assert costs.predict(4, 1) == 0.030
    assert costs.predict(8, 4) == pytest.approx(0.030 + 4 / 5 * 0.028)  # never measured: as a lone sequence
    costs.record(4, 4, 0.057)  # four sequences' plain step
    assert costs.predict(4, 4) == 0.057
    assert costs.predict(8, 4) == pytest.approx(0.057 + 4 * 0.005)  # the lone sequence's cost a row
    costs.record(8, 4, 0.100)
    assert costs.predict(12, 4) == pytest.approx(0.100 + 4 * (0.100 - 0.057) / 4)
    # Four sequences that a lone sequence's figures would have draft, and their own do not.
    memory_bound = {1: 0.018, 4: 0.020, 9: 0.024}
    lone, four = StepCosts(), StepCosts()
    lone.calibrate(memory_bound)
    four.calibrate(memory_bound)
    for rows in (4, 8, 12):
        four.record(rows, 4, linear(rows))
    offers = [steady(8, 0.8)] * 4
    assert sum(plan_drafts([0, 1, 2, 3], offers, lone, room=12)) > 0
    assert plan_drafts([0, 1, 2, 3], offers, four, room=12) == [0, 0, 0, 0]


def test_drafts_beside_other_sequences_are_planned_at_what_they_were_seen_to_cost() -> None:
    costs = StepCosts()
    costs.calibrate({1: 0.018, 4: 0.024, 9: 0.034})  # 2 ms a row: drafts look cheap
    costs.record(2, 2, 0.020)
    offers = [steady(8, 0.8), steady(8, 0.8)]
    assert sum(plan_drafts([0, 1], offers, costs, room=14)) > 0
    for _ in range(30):
        costs.record_shared_drafts(predicted=0.004, measured=0.040)  # ten times the prediction
    assert plan_drafts([0, 1], offers, costs, room=14) == [0, 0]
    assert plan_drafts([0], [steady(8, 0.8)], costs, room=14) != [0]  # a lone sequence's plan never uses it


def test_llama_cpp_makes_one_pass_per_run_of_consecutive_slots_with_equal_rows() -> None:
    assert ubatches([(0, 1), (1, 1), (2, 1), (3, 1)]) == [(4, 4)]  # (rows, sequences)
    assert ubatches([(0, 1), (4, 1), (8, 1)]) == [(1, 1), (1, 1), (1, 1)]
    assert ubatches([(0, 17), (1, 1), (2, 1), (3, 1)]) == [(4, 4), (16, 1)]
    assert ubatches([(0, 17), (1, 5), (2, 1), (3, 1)]) == [(4, 4), (8, 2), (12, 1)]
    assert ubatches([(0, 3), (1, 0), (2, 3)]) == [(3, 1), (3, 1)]


def test_uneven_drafts_that_split_the_batch_into_more_passes_do_not_pay() -> None:
    costs = measured(lambda rows: 0.018 + 0.002 * rows, range(1, 40))  # a pass costs most
    assert plan_drafts(
        [0, 1, 2, 3], [steady(8, 0.9), steady(0, 0.0), steady(0, 0.0), steady(0, 0.0)], costs, room=100
    ) == [0, 0, 0, 0]
    even = plan_drafts([0, 1, 2, 3], [steady(8, 0.9)] * 4, costs, room=100)
    assert len(set(even)) == 1 and even[0] > 0  # the same for each: still one pass
    assert plan_drafts([0], [steady(8, 0.9)], costs, room=100) == [8]


# -- in the scheduler ---------------------------------------------------------------------


def test_a_quoting_answer_is_the_plain_greedy_text_in_fewer_steps() -> None:
    weights = replying(EDITED)
    plain = Harness(slots=1, slot_context=256, next_token=weights, step_seconds=flat)
    job = plain.submit(QUOTE, max_tokens=80)
    plain.run_until_idle()
    fast = Harness(slots=1, slot_context=256, next_token=weights, step_seconds=flat, speculative=True)
    sped = fast.submit(QUOTE, max_tokens=80)
    fast.run_until_idle()
    assert fast.text(sped) == plain.text(job) == EDITED
    assert fast.ending(sped) == plain.ending(job) == ("end_of_sequence", len(sped.prompt), len(EDITED))
    stats = fast.scheduler.stats
    assert 0 < stats.accepted_tokens < stats.drafted_tokens  # "cat" was not in the passage
    assert stats.steps < plain.scheduler.stats.steps / 2
    assert max(drafted_rows(fast, 0, len(sped.prompt))) > 1
    assert fast.model.caches[0] == sped.prompt + tokens_of(EDITED)  # rejected drafts were trimmed


@pytest.mark.parametrize("seed", range(6))
def test_drafts_that_are_mostly_wrong_never_change_the_text(seed: int) -> None:
    rng = random.Random(seed)
    prompts = ["".join(rng.choice("ab ") for _ in range(rng.randint(3, 40))) for _ in range(5)]
    harness = Harness(slots=2, slot_context=128, step_seconds=flat, speculative=True)
    jobs = []
    for prompt in prompts:  # one at a time (a lone sequence drafts whenever it has a match), then two together
        jobs.append(harness.submit(prompt, max_tokens=rng.randint(1, 60)))
        harness.run_until_idle()
    jobs += [harness.submit(prompt, max_tokens=rng.randint(1, 60)) for prompt in prompts[:2]]
    harness.run_until_idle()
    prompts += prompts[:2]
    for prompt, job in zip(prompts, jobs, strict=True):
        assert harness.text(job) == reference(prompt, job.request.max_tokens)
        assert harness.ending(job)[2] == len(harness.text(job))  # one delta per token
    assert harness.scheduler.stats.drafted_tokens > 0


def test_a_drafted_end_of_sequence_ends_the_text_there() -> None:
    # The reply repeats the prompt's words up to its end: the drafts run past it.
    weights = replying("aaaa aaaa")
    fast = Harness(slots=1, slot_context=128, next_token=weights, step_seconds=flat, speculative=True)
    job = fast.submit("aaaa aaaa aaaa aaaa A:", max_tokens=40)
    fast.run_until_idle()
    assert fast.text(job) == "aaaa aaaa"
    assert fast.finished(job).reason == "end_of_sequence"
    assert weights(fast.model.caches[0][: len(job.prompt) + 9]) == EOS


def test_drafts_stop_at_max_tokens_and_at_the_end_of_the_slot() -> None:
    weights = replying(PASSAGE)
    fast = Harness(slots=1, slot_context=128, next_token=weights, step_seconds=flat, speculative=True)
    job = fast.submit(f"{PASSAGE} A:", max_tokens=10)
    fast.run_until_idle()
    assert fast.text(job) == PASSAGE[:10]
    assert fast.ending(job) == ("max_tokens", len(job.prompt), 10)
    texts = []
    for speculative in (False, True):
        short = Harness(slots=1, slot_context=len(job.prompt) + 12, next_token=weights, step_seconds=flat,
                        speculative=speculative)  # fmt: skip
        cut = short.submit(f"{PASSAGE} A:", max_tokens=60)
        short.run_until_idle()  # the fake refuses any row past the slot's context
        assert "context" in str(short.outcomes(cut)[-1])
        texts.append(short.text(cut))
    assert texts[1] == texts[0] == PASSAGE[:13]  # the 13th token is sampled, then has no room


def by_fours(rows: int) -> float:
    """llama.cpp's Q4_K kernels take rows four at a time: a step costs by groups of 4 rows."""
    return 0.010 + 0.004 * -(-rows // 4)


def test_a_lone_stream_s_drafts_in_loose_shapes_leave_its_answer_exact_as_it_goes() -> None:
    weights = replying(PASSAGE)
    prompt = f"Text: {PASSAGE}\nQuote it.{MARKER} A:"
    harness = Harness(
        slots=16, slot_context=256, chunk=128, prefill_budget=128, next_token=weights, step_seconds=by_fours,
        speculative=True, turn_marker=tokens_of(MARKER), loose=CPU_LOOSE,
    )  # fmt: skip
    job = harness.submit(prompt, max_tokens=80)
    harness.run_until_idle()  # `step` only: the idle recompute never runs
    assert harness.text(job) == PASSAGE
    generated = [[e for e in batch if e.position >= len(job.prompt)] for batch in harness.model.decoded]
    # Drafting steps that carried the tokens behind again, without logits, before their
    # own rows: loose shapes (a multiple of 4 rows, at least 8, padding included).
    loose_drafts = [b for b in generated if b and not b[0].wants_logits and sum(e.wants_logits for e in b) > 2]
    assert loose_drafts and all(len(b) % 4 == 0 and len(b) >= 8 for b in loose_drafts)
    assert harness.scheduler.stats.accepted_tokens > len(PASSAGE) // 2
    # The answer is exact up to its last few tokens, drafted ones included.
    exact = harness.scheduler._slots[0].reusable
    assert len(job.prompt) + len(PASSAGE) - CATCH_UP_AFTER <= exact <= len(job.prompt) + len(PASSAGE)

    reused = harness.scheduler.stats.reused_tokens
    turn_2 = f"{prompt}{PASSAGE}{MARKER} Again. A:"
    second = harness.submit(turn_2, max_tokens=len(PASSAGE) + 1)
    harness.run_until_idle()
    assert harness.scheduler.stats.reused_tokens - reused == exact
    cold = Harness(slots=1, slot_context=256, next_token=weights, step_seconds=by_fours)
    alone = cold.submit(turn_2, max_tokens=len(PASSAGE) + 1)
    cold.run_until_idle()
    assert harness.text(second) == cold.text(alone) == PASSAGE


def test_the_calibration_times_only_the_batch_sizes_a_step_can_have() -> None:
    # A step holds a row for each slot, or FEWEST_DRAFT_ROWS with fewer slots.
    for slots, most in ((4, FEWEST_DRAFT_ROWS), (16, MAX_DRAFT + 1)):
        harness = Harness(slots=slots, slot_context=64, step_seconds=flat, speculative=True)
        harness.scheduler.calibrate()
        timed = sorted({len(batch) for batch in harness.model.decoded})
        assert timed == [rows for rows in CALIBRATION_ROWS if rows <= most]


def test_a_sampled_request_is_never_speculated() -> None:
    harness = Harness(slots=1, slot_context=256, next_token=replying(PASSAGE), step_seconds=flat, speculative=True)
    job = harness.submit(f"{PASSAGE} A:", max_tokens=30, sampling=SamplingParams(temperature=0.7, seed=1))
    harness.run_until_idle()
    assert set(drafted_rows(harness, 0, len(job.prompt))) == {1}
    assert harness.scheduler.stats.drafted_tokens == 0


def test_a_compute_bound_batch_stops_speculating_once_it_has_measured_that() -> None:
    harness = Harness(slots=4, slot_context=256, next_token=hashed, step_seconds=linear, speculative=True)
    jobs = [harness.submit(f"ab ab ab ab {i}", max_tokens=50) for i in range(4)]
    harness.run_until_idle()
    late = harness.model.decoded[-20:]
    assert all(len(batch) <= 4 for batch in late)  # one row per sequence: drafting does not pay
    for i, job in enumerate(jobs):
        assert harness.text(job) == reference(f"ab ab ab ab {i}", 50)


def test_a_trimmed_cache_is_reused_like_any_other() -> None:
    weights = replying(EDITED)
    harness = Harness(slots=1, slot_context=256, next_token=weights, step_seconds=flat, speculative=True)
    first = harness.submit(QUOTE, max_tokens=80)
    harness.run_until_idle()
    second = harness.submit(QUOTE + " " + EDITED, max_tokens=20)
    harness.run_until_idle()
    assert harness.scheduler.stats.reused_tokens > 0
    assert harness.text(second) == reference(QUOTE + " " + EDITED, 20, weights)
    assert harness.text(first) == EDITED


def test_a_lone_request_is_computed_in_the_same_batch_shapes_however_noisy_later_steps_are() -> None:
    noise = random.Random(7)
    harness = Harness(
        slots=1, slot_context=256, next_token=replying(EDITED), speculative=True,
        step_seconds=lambda rows: flat(rows) * noise.uniform(0.5, 3.0),
    )  # fmt: skip
    harness.scheduler.calibrate()
    assert harness.model.caches[0] == []  # the timing batches left nothing behind
    shapes = []
    for _ in range(3):
        before = len(harness.model.decoded)
        job = harness.submit(QUOTE, max_tokens=80)
        harness.run_until_idle()
        assert harness.text(job) == EDITED
        shapes.append([len(batch) for batch in harness.model.decoded[before:]])
    # Prefix reuse makes the first prefill longer than the next ones; the decodes match.
    assert shapes[1] == shapes[2]
    assert shapes[0][-len(shapes[1]) + 1 :] == shapes[1][1:]


def test_sequences_that_do_not_draft_yet_learn_how_often_their_drafts_would_be_right() -> None:
    """Beside another sequence, a draft pays only when it is right more than 55% of the
    time here; a sequence starts at 50%, so without learning from the lookups it does
    not verify, it would never draft."""
    harness = Harness(
        slots=2, slot_context=256, next_token=replying(EDITED), speculative=True,
        step_seconds=lambda rows: 0.010 + 0.006 * rows,
    )  # fmt: skip
    harness.scheduler.calibrate()
    jobs = [harness.submit(QUOTE, max_tokens=80) for _ in range(2)]
    harness.run_until_idle()
    assert [harness.text(job) for job in jobs] == [EDITED, EDITED]
    assert harness.scheduler.stats.accepted_tokens > 0
    assert all(job.acceptance.rate > 0.8 for job in jobs)
