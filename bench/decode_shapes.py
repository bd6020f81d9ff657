"""What one llama_decode costs for the batch shapes the scheduler builds.

Why: the prefill budget (`--prefill-budget`) decides how many newcomers' prompt
tokens share a step with the running sequences. This times single llama_decode
calls on the packaged Gemma 3 270M (tcserve's own native layer, 16 slots x 2048,
no HTTP): 13 prompts of the benchmark's kind in one batch (varied lengths, then
cut to equal lengths, since llama.cpp splits a batch of unequal sequences into
several micro-batches), the same with one decoding sequence added, one decode
token alone, 14 sequences of one token each (every one wanting logits: the
262,144-word output layer), and one long sequence. Median of 3 runs each.

    .venv/bin/python bench/decode_shapes.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import load_prompts
from tcserve.engines.llamacpp.engine import default_model_path
from tcserve.engines.llamacpp.native import ContextParams, Model

Shape = list[tuple[int, list[int], int]]
"""(slot, tokens, first position) per sequence of the batch."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    args = parser.parse_args()
    model = Model(default_model_path(), ContextParams(slots=16, slot_context=2048, batch_tokens=528,
                                                      threads=args.threads))  # fmt: skip
    prompts = [model.vocab.tokenize(text) for text in load_prompts(16, 1000)]
    shortest = min(len(p) for p in prompts[:13])
    history = prompts[15][:30]  # slot 15 is the decoding sequence: 30 tokens of history, then one more
    varied: Shape = [(slot, prompts[slot], 0) for slot in range(13)]
    equal: Shape = [(slot, prompts[slot][:shortest], 0) for slot in range(13)]
    decoding: Shape = [(15, [prompts[15][30]], 30)]
    shapes: list[tuple[str, Shape]] = [
        ("13 prompts, varied lengths", varied),
        (f"13 prompts, equal length {shortest}", equal),
        ("1 decoding + 13 prompts, varied", decoding + varied),
        ("1 decoding + 13 prompts, equal", decoding + equal),
        ("1 decoding", decoding),
        ("14 sequences x 1 token", [(slot, prompts[slot][:1], 0) for slot in range(14)]),
        ("1 sequence, 455 tokens", [(0, [t for p in prompts[:13] for t in p][:455], 0)]),
    ]
    print(f"prompt lengths: {sorted(len(p) for p in prompts[:13])}; threads {args.threads}")
    print(f"| {'batch':<36} | tokens | ms (median of 3) |")
    print(f"|{'-' * 38}|--------|------------------|")
    for label, shape in shapes:
        times = [_time_decode(model, shape, history) for _ in range(3)]
        tokens = sum(len(tokens) for _, tokens, _ in shape)
        print(f"| {label:<36} | {tokens:>6} | {statistics.median(times) * 1000:>16.1f} |")
    model.close()
    return 0


def _time_decode(model: Model, shape: Shape, history: list[int]) -> float:
    for slot in range(16):
        model.forget(slot)
    if any(slot == 15 for slot, _, _ in shape):  # give the decoding sequence its history first
        model.batch.clear()
        for position, token in enumerate(history):
            model.batch.add(token, position, 15, False)
        assert model.decode() == 0
    model.batch.clear()
    for slot, tokens, start in shape:
        for offset, token in enumerate(tokens):
            model.batch.add(token, start + offset, slot, offset == len(tokens) - 1)
    started = time.perf_counter()
    status = model.decode()
    elapsed = time.perf_counter() - started
    assert status == 0, f"llama_decode returned {status}"
    return elapsed


if __name__ == "__main__":
    raise SystemExit(main())
