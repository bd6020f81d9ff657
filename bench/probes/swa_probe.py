"""What swa_full=False (llama.cpp's sliding-window cache of n_swa + n_ubatch cells per
sequence, instead of the whole context) would do to tcserve's cache tricks, next to
swa_full=True (tcserve's setting until it turned swa_full off), on the packaged Gemma 3 270M (window 512).

    python bench/probes/swa_probe.py

a. prefix reuse: prefill L tokens, trim back to `keep` with llama_memory_seq_rm, and
   continue the same prompt from `keep`; the last token's logits against a fresh
   computation in the same aligned 128-token chunks.
b. determinism: a prompt's last-token logits fresh in a cleared sequence, after reusing
   a cached prefix, in another slot, and after the slot held a longer unrelated sequence.
c. speculative trim: 1 + k tokens in one decode, the last j removed with seq_rm, then
   the next token; against a sequence that never held the rejected tokens.
Every comparison is bitwise ("same") or prints the largest absolute logit difference.
"""

from __future__ import annotations

from pathlib import Path

import llama_cpp as llama
import numpy as np
import numpy.typing as npt

from tcserve.engines.llamacpp import native
from tcserve.engines.llamacpp.engine import default_model_path

CHUNK = 128
SLOTS = 4
ROOT = Path(__file__).resolve().parents[2]


def open_model(swa_full: bool) -> native.Model:
    original = native._context_params

    def patched(params: native.ContextParams) -> llama.llama_context_params:
        context = original(params)
        context.swa_full = swa_full
        return context

    native._context_params = patched
    try:  # tcserve's own sizes: n_batch = n_ubatch = slots + 256
        return native.Model(default_model_path(), native.ContextParams(SLOTS, 2048, SLOTS + 256, threads=2))
    finally:
        native._context_params = original


class Probe:
    def __init__(self, model: native.Model) -> None:
        self.m = model
        self.memory = llama.llama_get_memory(model._ctx)

    def decode(self, slot: int, tokens: list[int], start: int, logits_rows: int = 1) -> list[npt.NDArray[np.float32]]:
        """One llama_decode of `tokens` at positions start...; logits of the last rows."""
        batch = self.m.batch
        batch.clear()
        for i, token in enumerate(tokens):
            batch.add(token, start + i, slot, i >= len(tokens) - logits_rows)
        assert self.m.decode() == 0
        return [np.array(self.m.logits(i)) for i in range(len(tokens) - logits_rows, len(tokens))]

    def prefill(self, slot: int, prompt: list[int], start: int = 0) -> npt.NDArray[np.float32]:
        """prompt[start:] in chunks aligned to CHUNK from position 0; last token's logits."""
        row = None
        while start < len(prompt):
            end = min(start - start % CHUNK + CHUNK, len(prompt))
            row = self.decode(slot, prompt[start:end], start)[0]
            start = end
        assert row is not None
        return row

    def trim(self, slot: int, keep: int) -> None:
        llama.llama_memory_seq_rm(self.memory, slot, keep, -1)

    def span(self, slot: int) -> tuple[int, int]:
        return (llama.llama_memory_seq_pos_min(self.memory, slot), llama.llama_memory_seq_pos_max(self.memory, slot))


def diff(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> str:
    d = float(np.abs(a - b).max())
    return "same" if d == 0 else f"max|d|={d:.3g}" + ("" if a.argmax() == b.argmax() else " ARGMAX DIFFERS")


def prefix_reuse(p: Probe, text: list[int], length: int) -> None:
    prompt = text[:length]
    p.trim(0, 0)
    fresh = p.prefill(0, prompt)
    for keep in (128, 640, 896, 1024, 1152, 1280, 1408):
        p.trim(0, 0)
        p.prefill(0, prompt)
        before = p.span(0)
        p.trim(0, keep)
        after = p.span(0)
        got = p.prefill(0, prompt, keep)
        print(f"  a L={length} keep={keep:4d}: pos {before} -> after trim {after}: {diff(got, fresh)}")


def determinism(p: Probe, text: list[int], other: list[int]) -> None:
    prompt = text[:700]
    p.trim(0, 0)
    fresh = p.prefill(0, prompt)
    p.trim(0, 0)  # cached prompt + 20 generated tokens, trimmed back to a chunk boundary
    p.prefill(0, prompt)
    for i in range(20):
        p.decode(0, [text[700 + i]], 700 + i)
    p.trim(0, 640)
    print(f"  b reuse of 640 cached tokens:            {diff(p.prefill(0, prompt, 640), fresh)}")
    p.trim(3, 0)
    print(f"  b fresh in another slot:                 {diff(p.prefill(3, prompt), fresh)}")
    for held in (1900,):
        p.trim(1, 0)
        p.prefill(1, other[:held])
        p.trim(1, 0)
        print(f"  b slot 1 after an unrelated {held:4d}-token sequence: {diff(p.prefill(1, prompt), fresh)}")
    p.trim(2, 0)
    p.prefill(2, other[:1900])
    p.trim(2, 0)
    p.prefill(2, other[:300])  # a short one in between, then the prompt
    p.trim(2, 0)
    print(f"  b slot 2 after 1900 then 300 unrelated:  {diff(p.prefill(2, prompt), fresh)}")


def speculative_trim(p: Probe, text: list[int], n: int, k: int) -> None:
    prompt = text[:n]
    for j in (0, 2, 4):
        accepted = text[n : n + 1 + k - j]
        nxt = text[n + 1 + k]  # the token decoded after the accepted ones
        p.trim(0, 0)
        p.prefill(0, prompt)
        p.decode(0, text[n : n + 1 + k], n, logits_rows=1 + k)
        p.trim(0, n + len(accepted))
        span = p.span(0)
        got = p.decode(0, [nxt], n + len(accepted))[0]
        p.trim(1, 0)
        p.prefill(1, prompt)
        p.decode(1, accepted, n, logits_rows=len(accepted))
        want = p.decode(1, [nxt], n + len(accepted))[0]
        print(f"  c n={n} k={k} j={j}: pos after trim {span}: {diff(got, want)}")


def main() -> None:
    source = "".join((ROOT / f).read_text() for f in ("README.md", "src/tcserve/engines/llamacpp/scheduler.py"))
    for swa_full in (False, True):
        model = open_model(swa_full)
        p = Probe(model)
        text = model.vocab.tokenize(source)
        other = model.vocab.tokenize(source[::-1])
        assert len(text) > 2100 and len(other) > 1900
        print(f"swa_full={swa_full}  (n_ubatch {SLOTS + 256}, {SLOTS} slots x 2048)")
        prefix_reuse(p, text, 1500)
        determinism(p, text, other)
        for n in (600, 1200):
            speculative_trim(p, text, n, 4)
        model.close()


if __name__ == "__main__":
    main()
