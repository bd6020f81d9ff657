"""Tokens mean one thing: for a request that ends on a stop sequence, one that ends
on max tokens and one that is cancelled, the ledger, /metrics, the key's output-token
limit and `tcserve usage` show the same numbers."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from support import PROMPT, VERSION, fake_model, serve_app, settings
from tcserve.accounting.keys import KeyRecord, digest, write_keys
from tcserve.api.app import create_app
from tcserve.cli import main

OUTPUT_LIMIT = 1000


def ledger(data_dir: Path) -> dict[str, tuple[int, int, str]]:
    with sqlite3.connect(data_dir / "usage.sqlite3") as db:
        found = db.execute("SELECT request_id, input_tokens, output_tokens, status FROM usage").fetchall()
    return {row[0]: row[1:] for row in found}


def metric(text: str, name: str) -> float:
    match = re.search(rf'^{name}{{model="fake"}} (\S+)$', text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_ledger_metrics_limits_and_usage_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys.toml"
    write_keys(keys, [KeyRecord(name="alice", sha256=digest("sk-alice"), output_tokens_per_minute=OUTPUT_LIMIT)])
    app = create_app(settings(data_dir=tmp_path, keys_file=keys),
                     [fake_model(reply=" one two three four five six seven eight", token_delay=0.02)])  # fmt: skip
    headers = {**VERSION, "x-api-key": "sk-alice"}
    body = {"model": "fake", "prompt": PROMPT, "max_tokens_to_sample": 6}
    with serve_app(app) as url:
        app.state.tcserve.limiter.clock = lambda: 1000.0  # no refill: the bucket shows exactly what was charged
        stopped = httpx.post(f"{url}/v1/complete", headers=headers, json={**body, "stop_sequences": [" three"]})
        capped = httpx.post(f"{url}/v1/complete", headers=headers, json={**body, "max_tokens_to_sample": 2})
        with httpx.stream("POST", f"{url}/v1/complete", headers=headers, json={**body, "stream": True}) as hung_up:
            lines = hung_up.iter_lines()
            while not next(lines).startswith("data:"):  # one completion event, then hang up
                pass
            cancelled = hung_up.headers["request-id"]
        ids = [stopped.headers["request-id"], capped.headers["request-id"], cancelled]
        deadline = time.monotonic() + 30  # the cancelled row is written without waiting for it
        while set(ids) - set(ledger(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.02)
        rows = ledger(tmp_path)
        scraped = httpx.get(f"{url}/metrics").text
        remaining = httpx.post(f"{url}/v1/complete", headers=headers, json={**body, "max_tokens_to_sample": 1})
        last = ledger(tmp_path)[remaining.headers["request-id"]]
    assert stopped.json()["completion"] == " one two" and stopped.json()["stop"] == " three"
    assert capped.json()["stop_reason"] == "max_tokens"
    assert [rows[i][1:] for i in ids[:2]] == [(3, "complete"), (2, "complete")]  # a stop's own token counts
    assert 1 <= rows[cancelled][1] < 6 and rows[cancelled][2] == "cancelled"
    output = sum(rows[i][1] for i in ids)
    prompt = sum(rows[i][0] for i in ids)
    assert metric(scraped, "tcserve_generated_tokens_total") == output
    assert metric(scraped, "tcserve_prompt_tokens_total") == prompt
    # A whole (not streamed) response starts after its own one token was charged.
    assert int(remaining.headers["anthropic-ratelimit-output-tokens-remaining"]) == OUTPUT_LIMIT - output - 1
    assert main(["usage", "--data-dir", str(tmp_path), "--key", "alice"]) == 0
    total = capsys.readouterr().out.splitlines()[-1].split()
    assert total[-3:] == ["4", str(prompt + last[0]), str(output + last[1])]
