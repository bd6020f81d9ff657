"""The usage ledger: complete, cancelled and failed requests are recorded; a request
its client saw finish is in the ledger even when the server is killed right after."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from support import PROMPT, VERSION, fake_model, free_port, serve_app, settings, wait_healthy
from tcserve.accounting.keys import KeyRecord, digest, write_keys
from tcserve.api.app import create_app
from tcserve.cli import main


def rows(data_dir: Path) -> dict[str, tuple[str, str, int, int, str, str]]:
    with sqlite3.connect(data_dir / "usage.sqlite3") as db:
        found = db.execute("SELECT request_id, key_name, model, input_tokens, output_tokens, status, stop_reason "
                           "FROM usage").fetchall()  # fmt: skip
    return {r[0]: r[1:] for r in found}


def body(**overrides: object) -> dict[str, object]:
    return {"model": "fake", "prompt": PROMPT, "max_tokens_to_sample": 3, **overrides}


def test_complete_cancelled_and_failed_are_recorded(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    write_keys(keys, [KeyRecord(name="alice", sha256=digest("sk-alice"))])
    app = create_app(settings(data_dir=tmp_path, keys_file=keys),
                     [fake_model(reply=" one two three four five", token_delay=0.01),
                      fake_model(name="broken", reply=" a b c", fail_after=1)])  # fmt: skip
    headers = {**VERSION, "x-api-key": "sk-alice"}
    with serve_app(app) as url:
        done = httpx.post(f"{url}/v1/complete", headers=headers, json=body())
        streamed = httpx.post(f"{url}/v1/complete", headers=headers, json=body(stream=True, model="claude-haiku-4-5"))
        failed = httpx.post(f"{url}/v1/complete", headers=headers, json=body(model="broken"))
        with httpx.stream("POST", f"{url}/v1/complete", headers=headers,
                          json=body(stream=True, max_tokens_to_sample=5)) as hung_up:  # fmt: skip
            lines = hung_up.iter_lines()
            next(lines)
            cancelled_id = hung_up.headers["request-id"]
            lines.close()
        deadline = time.monotonic() + 10
        while cancelled_id not in rows(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.02)
    found = rows(tmp_path)
    prompt_tokens = len(PROMPT) + 1  # the fake engine's count
    assert found[done.headers["request-id"]] == ("alice", "fake", prompt_tokens, 3, "complete", "max_tokens")
    assert found[streamed.headers["request-id"]][1:] == ("claude-haiku-4-5", prompt_tokens, 3, "complete", "max_tokens")
    assert failed.status_code == 500 and found[failed.headers["request-id"]][4] == "failed"
    assert found[cancelled_id][4] == "cancelled"


def test_usage_command_prints_totals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = create_app(settings(data_dir=tmp_path), [fake_model(reply=" a b c d")])
    with serve_app(app) as url:
        for _ in range(3):
            httpx.post(f"{url}/v1/complete", headers=VERSION, json=body(max_tokens_to_sample=2))
    assert main(["usage", "--data-dir", str(tmp_path)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if " fake " in line)
    assert line.split()[-3:] == ["3", str(3 * (len(PROMPT) + 1)), "6"]
    assert main(["usage", "--data-dir", str(tmp_path), "--since", "2999-01-01"]) == 0
    assert " fake " not in capsys.readouterr().out
    assert main(["usage", "--data-dir", str(tmp_path), "--key", "-"]) == 0  # requests made without a key
    assert any(line.split()[:3] == ["-", "fake", "3"] for line in capsys.readouterr().out.splitlines())


def test_usage_command_filters_by_key_and_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys.toml"
    write_keys(
        keys, [KeyRecord(name="alice", sha256=digest("sk-alice")), KeyRecord(name="bob", sha256=digest("sk-bob"))]
    )
    app = create_app(settings(data_dir=tmp_path, keys_file=keys), [fake_model(reply=" a b c d")])
    with serve_app(app) as url:
        for key, model, count in (("sk-alice", "fake", 2), ("sk-alice", "claude-haiku-4-5", 1), ("sk-bob", "fake", 4)):
            for _ in range(count):
                response = httpx.post(f"{url}/v1/complete", headers={**VERSION, "x-api-key": key},
                                      json=body(model=model, max_tokens_to_sample=2))  # fmt: skip
                assert response.status_code == 200

    def printed(*flags: str) -> list[list[str]]:
        assert main(["usage", "--data-dir", str(tmp_path), *flags]) == 0
        return [line.split()[:-2] for line in capsys.readouterr().out.splitlines()[1:]]  # without the token columns

    assert printed() == [
        ["alice", "claude-haiku-4-5", "1"],
        ["alice", "fake", "2"],
        ["bob", "fake", "4"],
        ["total", "7"],
    ]
    assert printed("--key", "alice") == [["alice", "claude-haiku-4-5", "1"], ["alice", "fake", "2"], ["total", "3"]]
    assert printed("--model", "fake") == [["alice", "fake", "2"], ["bob", "fake", "4"], ["total", "6"]]
    assert printed("--key", "bob", "--model", "claude-haiku-4-5") == []


def test_kill_9_under_load_loses_no_request_the_client_saw_finish(tmp_path: Path) -> None:
    config = tmp_path / "tcserve.toml"
    config.write_text("[[models]]\nname = 'fake'\nengine = 'fake'\nreply = ' a b c d e f'\ntoken_delay = 0.002\n")
    port = free_port()
    command = [sys.executable, "-m", "tcserve", "serve", "--config", str(config), "--port", str(port),
               "--data-dir", str(tmp_path)]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    seen: list[str] = []
    killed = threading.Event()

    def client(number: int) -> None:
        with httpx.Client(base_url=url, headers=VERSION) as http:
            for i in range(1000):
                try:
                    response = http.post(
                        "/v1/complete", json=body(stream=(number + i) % 2 == 0, max_tokens_to_sample=4)
                    )
                except httpx.TransportError:
                    return  # the server is gone
                if response.status_code == 200 and '"stop_reason":"max_tokens"' in response.text:
                    seen.append(response.headers["request-id"])  # its final event reached us
                if len(seen) >= 80 and not killed.is_set():
                    killed.set()
                    os.kill(process.pid, signal.SIGKILL)  # while the other clients are mid-request

    try:
        wait_healthy(url, process)
        clients = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(60)
    finally:
        process.kill()
        process.wait()
    assert killed.is_set() and len(seen) >= 80
    # Restart on the same data folder: the ledger opens (WAL recovery) and holds every one of them.
    restarted = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, restarted)
    finally:
        restarted.terminate()
        restarted.wait(30)
    recorded = rows(tmp_path)
    assert [rid for rid in seen if recorded.get(rid, ("",) * 5)[4] != "complete"] == []
