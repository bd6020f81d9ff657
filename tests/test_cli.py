"""The command line: `serve` as a real process, and `complete` / `models` as clients."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support import VERSION, fake_model, free_port, serve_app, settings, wait_healthy
from tcserve.api.app import create_app
from tcserve.cli.main import _parser, main
from tcserve.engines.fake import FakeEngine

KEY = "sk-cli-secret-123"
WRONG_KEY = "sk-cli-wrong-456"


def test_every_flag_has_help() -> None:
    parser = _parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(commands) == {"serve", "models", "complete", "keys", "usage"}
    parsers = dict(commands)
    actions = commands["keys"]._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    parsers.update({f"keys {name}": parser for name, parser in actions.items()})
    for name, command in parsers.items():
        for action in command._actions:
            assert action.help, f"tcserve {name} {action.option_strings} has no help"
    serve_help = commands["serve"].format_help()
    for flag in ("--host", "--port", "--config", "--api-key", "--model-path", "--ctx-size", "--threads"):
        assert flag in serve_help


def test_bad_config_exits_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[[models]]\nname = 'x'\npath = 'nope.gguf'\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert "no such GGUF file" in capsys.readouterr().err


def test_bad_flag_value_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "70000"]) == 2
    assert "port" in capsys.readouterr().err


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[str, FakeEngine]]:
    app = create_app(settings(api_keys=(KEY,)), [fake_model(reply=" Blue light scatters more.")])
    with serve_app(app) as url:
        yield url, app.state.tcserve.engines.by_name["fake"]


def test_complete_streams_and_wraps_a_bare_prompt(
    fake_server: tuple[str, FakeEngine], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url, engine = fake_server
    monkeypatch.setenv("ANTHROPIC_BASE_URL", url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    assert main(["complete", "Why is the sky blue?", "--model", "fake", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == " Blue light scatters more.\n"
    assert engine.requests[-1].prompt == "\n\nHuman: Why is the sky blue?\n\nAssistant:"
    assert engine.requests[-1].sampling.temperature == 0


def test_complete_reports_errors(fake_server: tuple[str, FakeEngine], capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = fake_server
    assert main(["complete", "hi", "--model", "nope", "--base-url", url, "--api-key", KEY]) == 1
    assert "404 not_found_error: model: nope" in capsys.readouterr().err
    assert main(["complete", "hi", "--base-url", url, "--api-key", WRONG_KEY]) == 1
    assert "401 authentication_error" in capsys.readouterr().err


def test_complete_without_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["complete", "hi", "--base-url", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "connection to" in capsys.readouterr().err


def test_models_lists_ids(fake_server: tuple[str, FakeEngine], capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = fake_server
    assert main(["models", "--base-url", url, "--api-key", KEY]) == 0
    out = capsys.readouterr().out
    assert "claude-opus-4-6" in out and "claude-2.1" in out and len(out.splitlines()) == 29
    assert out.splitlines()[0].split() == ["id", "loaded", "format", "size", "file"]
    assert [line.split() for line in out.splitlines() if line.startswith("fake ")] == [
        ["fake", "yes", "fake", "-", "-"]
    ]


def test_serve_process_logs_request_ids_and_never_keys(tmp_path: Path) -> None:
    config = tmp_path / "tcserve.toml"
    config.write_text("[[models]]\nname = 'fake'\nengine = 'fake'\n")
    port = free_port()
    command = [sys.executable, "-m", "tcserve", "serve", "--config", str(config), "--port", str(port),
               "--api-key", KEY]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        body = {"model": "fake", "prompt": "\n\nHuman: hi\n\nAssistant:", "max_tokens_to_sample": 3}
        ok = httpx.post(f"{url}/v1/complete", headers={**VERSION, "x-api-key": KEY}, json=body)
        denied = httpx.get(f"{url}/v1/models", headers={**VERSION, "authorization": f"Bearer {WRONG_KEY}"})
    finally:
        process.send_signal(signal.SIGINT)
        _, logs = process.communicate(timeout=30)
    assert ok.status_code == 200 and denied.status_code == 401
    assert f"{ok.headers['request-id']} tcserve.access: POST /v1/complete 200" in logs
    assert f"{denied.headers['request-id']} tcserve.access: GET /v1/models 401" in logs
    assert KEY not in logs and WRONG_KEY not in logs
    assert process.returncode == 0
