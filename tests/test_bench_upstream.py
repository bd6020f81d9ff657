"""bench/upstream_overhead.py with a vLLM upstream, end to end, on vLLM's CPU build.

The script is meant for a GPU machine (a 1B random model at c=1, 16 and 64, see its
docstring); here it runs at the smallest size on the tests' tiny model, so that what
it does around the numbers is checked: vLLM started offline on a model folder,
tcserve in front of it, both paths answered without an error, the tokens counted with
the model's own tokenizer (a count by another one falls outside the bounds below),
and the table and targets written. (vLLM 0.32 also answers a request that names no
model, so the served name the script sends is not what this test shows.)
The figures themselves are not checked: vLLM's CPU build on two cores says nothing
about tcserve's overhead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_support import VLLM_PYTHON, build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 16

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM venv at {VLLM_PYTHON} (see test_upstream_vllm.py)"),
    pytest.mark.timeout(600),
]


def test_upstream_overhead_runs_against_vllm_and_writes_its_table(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny-llama")
    out = tmp_path / "results"
    command = [
        sys.executable, str(ROOT / "bench" / "upstream_overhead.py"), "--upstream", "vllm",
        "--model-dir", str(model), "--levels", "1,2", "--requests", "2", "--max-tokens", str(MAX_TOKENS),
        "--ctx-size", "512", "--vllm-args", "--dtype float32 --enforce-eager", "--vllm-timeout", "300",
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=540, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    (data_file,) = out.glob("*-upstream-overhead.json")
    rows = json.loads(data_file.read_text())["rows"]
    assert set(rows) == {"direct c=1", "via tcserve c=1", "direct c=2", "via tcserve c=2"}
    for name, row in rows.items():
        level = int(name.rpartition("c=")[2])
        assert row["requests"] == 2 * max(2, 2 * level), name  # two rounds of at least twice the level
        assert row["errors"] == 0, name
        # The tiny model never picks its end token, so each answer runs to max_tokens; re-tokenising the text
        # may split it a little differently from how it was sampled.
        assert MAX_TOKENS - 3 <= row["tok_req"] <= MAX_TOKENS + 3, (name, row)
        assert row["ttft_p50_ms"] > 0
    (table_file,) = out.glob("*-upstream-overhead.md")
    table = table_file.read_text()
    assert "upstream: vLLM " in table
    assert table.count("tok/s >= 0.95x") == 2  # a verdict per level
