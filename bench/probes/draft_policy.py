"""How many drafted tokens a lone greedy stream should verify a step, replayed on the
model's real greedy answers with step costs measured in the same run.

1. Times one sequence's llama_decode of 1 to 16 rows, every row with logits (what a
   step that verifies rows - 1 drafted tokens costs), at position 200 of slot 0.
2. Decodes the bench's grounded prompts (quote, code fix, extract) and free-text
   prompts plainly, one token a step, and keeps each greedy answer.
3. Prints how often the next lookup token was right after a run of right ones.
4. Replays speculation on each answer with tcserve's own lookups (`NgramDrafts`) and
   planner (`plan_drafts`), the measured costs and each policy's chances, and prints
   the decode seconds it predicts (prefill excluded), against the policy of 8-token
   drafts at a fixed rate (tcserve's policy before run-aware chances, here with
   today's lookups), against plain suffix lookups (without realigning after a token
   the model replaced, and without learned replacements: tcserve's lookups before
   them) and against an oracle that knows how much of each draft is right.

The replay counts the costs of decodes only: it shows which policy wastes fewer
steps, not the server's tok/s (bench/run.py measures those).

    .venv/bin/python bench/probes/draft_policy.py [--prompts 36] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import texts
from load import load_prompts
from tcserve.engines.llamacpp.engine import default_model_path
from tcserve.engines.llamacpp.native import ContextParams, Model
from tcserve.engines.llamacpp.speculation import (
    MAX_DRAFT,
    Acceptance,
    NgramDrafts,
    StepCosts,
    agreeing,
    plan_drafts,
)

MAX_TOKENS = 128

Chances = Callable[[Acceptance, int], list[float]]


class PlainLookups(NgramDrafts):
    """Suffix lookups only: no realigning, no learned replacements."""

    def _realign(self) -> int | None:
        return None

    def _learn(self, token: int) -> None:
        return None


def row_costs(model: Model, most: int, rounds: int = 3) -> dict[int, float]:
    tokens = model.vocab.tokenize("The quick brown fox jumps over the lazy dog. " * 40)[:200]
    model.batch.clear()
    for position, token in enumerate(tokens):
        model.batch.add(token, position, 0, False)
    assert model.decode() == 0
    seconds: dict[int, list[float]] = defaultdict(list)
    for _ in range(rounds):
        for rows in range(1, most + 1):
            model.batch.clear()
            for offset in range(rows):
                model.batch.add(tokens[offset], 200 + offset, 0, True)
            started = time.perf_counter()
            assert model.decode() == 0
            seconds[rows].append(time.perf_counter() - started)
            model.forget(0, 200)
    model.forget(0)
    return {rows: min(values) for rows, values in seconds.items()}


def greedy(model: Model, prompt: str) -> tuple[list[int], list[int]]:
    """The prompt's tokens and its plain greedy answer (up to MAX_TOKENS or the end)."""
    ids = model.vocab.tokenize(prompt)
    model.forget(0)
    model.batch.clear()
    for position, token in enumerate(ids):
        model.batch.add(token, position, 0, position == len(ids) - 1)
    assert model.decode() == 0
    answer: list[int] = []
    index = len(ids) - 1  # the batch row whose logits give the next token
    while len(answer) < MAX_TOKENS:
        token = int(model.logits(index).argmax())
        if model.vocab.is_end(token):
            break
        answer.append(token)
        model.batch.clear()
        model.batch.add(token, len(ids) + len(answer) - 1, 0, True)
        assert model.decode() == 0
        index = 0
    return ids, answer


def fixed_rate(acceptance: Acceptance, available: int) -> list[float]:
    return [acceptance.rate**j for j in range(1, available + 1)]


def run_aware(acceptance: Acceptance, available: int) -> list[float]:
    return acceptance.chances(available)


def replay(
    prompt: list[int],
    answer: list[int],
    costs: dict[int, float],
    chances: Chances | None,
    most: int,
    lookups: type[NgramDrafts] = NgramDrafts,
) -> float:
    """Predicted decode seconds for the answer; `chances` None: the oracle."""
    model_costs = StepCosts()
    model_costs.calibrate(costs)
    drafts, acceptance = lookups([*prompt, answer[0]]), Acceptance()
    produced, seconds = 1, 0.0  # the prefill yields the first token
    while produced < len(answer):
        proposal = drafts.propose(min(most, MAX_TOKENS - produced - 1))
        truth = answer[produced:]
        right = agreeing(proposal, truth)
        if chances is None:
            verified = max(range(right + 1), key=lambda v: (v + 1) / costs[1 + v])
        elif proposal:
            verified = plan_drafts([0], [chances(acceptance, len(proposal))], model_costs, room=most)[0]
        else:
            verified = 0
        acceptance.learn(len(proposal), verified, right)
        gained = min(min(right, verified) + 1, len(truth))
        drafts.extend(truth[:gained])
        produced += gained
        seconds += costs[1 + verified]
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=36, help="prompts of each kind (default 36)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    args = parser.parse_args()
    model = Model(default_model_path(), ContextParams(slots=1, slot_context=2048, batch_tokens=256,
                                                      threads=args.threads))  # fmt: skip
    costs = row_costs(model, MAX_DRAFT + 1)
    print("one sequence's step, every row with logits (min of 3):")
    for rows, seconds in costs.items():
        print(f"  {rows:2d} rows: {seconds * 1000:6.1f} ms, {seconds * 1000 / rows:5.1f} ms a row")
    kinds = {
        "grounded": texts.grounded_prompts(args.prompts, 0),
        "free text": load_prompts(args.prompts, 0),
    }
    answers = {kind: [greedy(model, prompt.rstrip()) for prompt in prompts] for kind, prompts in kinds.items()}
    model.close()

    print("\nnext lookup token right, by right ones just before it (plain greedy answers):")
    for kind, pairs in answers.items():
        seen: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        for prompt, answer in pairs:
            drafts, run = NgramDrafts([*prompt, answer[0]]), 0
            for token in answer[1:]:
                proposal = drafts.propose(1)
                if proposal:
                    counts = seen[min(run, 16)]
                    counts[0] += proposal[0] == token
                    counts[1] += 1
                    run = run + 1 if proposal[0] == token else 0
                else:
                    run = 0
                drafts.extend([token])
        row = ", ".join(
            f"{run}{'+' if run == 16 else ''}: {right / total:.0%}" for run, (right, total) in sorted(seen.items())
        )
        print(f"  {kind}: {row}")

    policies: dict[str, tuple[Chances | None, int, type[NgramDrafts]]] = {
        "fixed rate, 8 drafts (before)": (fixed_rate, 8, NgramDrafts),
        "runs, 8 drafts": (run_aware, 8, NgramDrafts),
        f"runs, {MAX_DRAFT}, plain lookups": (run_aware, MAX_DRAFT, PlainLookups),
        f"runs, {MAX_DRAFT} drafts (tcserve)": (run_aware, MAX_DRAFT, NgramDrafts),
        f"oracle, {MAX_DRAFT} drafts": (None, MAX_DRAFT, NgramDrafts),
    }
    print("\npredicted decode seconds (all answers of a kind), and against the first policy:")
    for kind, pairs in answers.items():
        base = None
        for name, (chances, most, lookups) in policies.items():
            total = sum(replay(prompt, answer, costs, chances, most, lookups) for prompt, answer in pairs)
            base = base or total
            tokens = sum(len(answer) for _, answer in pairs)
            print(f"  {kind:9s} {name:31s} {total:6.2f} s  {tokens / total:6.1f} tok/s  {base / total:5.3f}x")
    print(f"\n(median answer length: {statistics.median(len(a) for p in answers.values() for _, a in p)} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
