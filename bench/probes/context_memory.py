"""Where a tcserve llama.cpp context's memory goes: llama.cpp's buffer sizes (from its
own log lines) and this process's VmRSS/VmHWM, after loading and after a workload that
touches every buffer (a long prompt in aligned 128-token chunks, then decode steps
with every slot generating). One configuration per process, so the figures are its own.

    python bench/probes/context_memory.py --parallel 16 [--swa-full 0] [--outputs-max 16]
        [--batch-tokens N] [--rows-per-seq K]

--outputs-max sets llama_context_params.n_outputs_max (0: llama.cpp's default, n_batch);
--rows-per-seq K asks logits for K rows of every sequence in the decode steps (what
speculative verification of K-1 drafts does).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from tcserve.engines.llamacpp import native
from tcserve.engines.llamacpp.engine import default_model_path

BUFFER = re.compile(r"(CPU_\w+ model|CPU KV|CPU +output|CPU compute) buffer size = +([\d.]+) MiB")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def buffers(lines: list[str]) -> list[tuple[str, float]]:
    return [(m[1].replace("  ", " "), float(m[2])) for line in lines if (m := BUFFER.search(line))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--ctx-size", type=int, default=2048)
    parser.add_argument("--swa-full", type=int, default=1)
    parser.add_argument("--outputs-max", type=int, default=0)
    parser.add_argument("--batch-tokens", type=int, default=0, help="n_batch = n_ubatch (0: parallel + 256)")
    parser.add_argument("--rows-per-seq", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=1500)
    args = parser.parse_args()
    handler = _Lines()
    logger = logging.getLogger("tcserve.llamacpp")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)

    def patched(params: native.ContextParams):  # type: ignore[no-untyped-def]
        context = original(params)
        context.swa_full = bool(args.swa_full)
        context.n_outputs_max = args.outputs_max
        return context

    original, native._context_params = native._context_params, patched
    path = default_model_path()
    baseline = status_mib("VmRSS")
    batch_tokens = args.batch_tokens or args.parallel + 256
    params = native.ContextParams(args.parallel, args.ctx_size, batch_tokens, threads=2)
    model = native.Model(path, params)
    loaded = status_mib("VmRSS")
    batch = model.batch
    prompt = [2] + [(i * 7919) % 20000 + 1000 for i in range(args.prompt - 1)]
    for start in range(0, len(prompt), 128):
        batch.clear()
        for pos in range(start, min(start + 128, len(prompt))):
            batch.add(prompt[pos], pos, 0, pos == len(prompt) - 1)
        assert model.decode() == 0
    for step in range(4):  # every slot generates; K rows of each want logits
        batch.clear()
        for slot in range(args.parallel):
            base = len(prompt) + step * args.rows_per_seq if slot == 0 else step * args.rows_per_seq
            for row in range(args.rows_per_seq):
                batch.add(1000 + row, base + row, slot, True)
        assert model.decode() == 0, "decode failed"
    report = {
        "config": vars(args) | {"batch_tokens": batch_tokens},
        "python_baseline_rss_mib": round(baseline, 1),
        "rss_after_load_mib": round(loaded, 1),
        "rss_after_work_mib": round(status_mib("VmRSS"), 1),
        "hwm_mib": round(status_mib("VmHWM"), 1),
        "llama_buffers_mib": buffers(handler.lines),
    }
    print(json.dumps(report))
    model.close()


if __name__ == "__main__":
    main()
