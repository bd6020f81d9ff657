"""Per-key access: a keys file of hashes, model permissions (403), per-minute limits
(429 + retry-after) and the anthropic-ratelimit-* headers; the `tcserve keys` command."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support import PROMPT, VERSION, fake_model, serve_app, settings
from tcserve.accounting.keys import KeyRecord, digest, read_keys, write_keys
from tcserve.accounting.limits import Limiter
from tcserve.api.app import create_app
from tcserve.cli import main
from tcserve.config import ConfigError
from tcserve.errors import RateLimited

CLI_KEY = "sk-cli-unlimited"


def body(**overrides: object) -> dict[str, object]:
    return {"model": "fake", "prompt": PROMPT, "max_tokens_to_sample": 3, **overrides}


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    keys = tmp_path / "keys.toml"
    write_keys(keys, [
        KeyRecord(name="only-fake", sha256=digest("sk-only-fake"), models=("fake",)),
        KeyRecord(name="two-per-minute", sha256=digest("sk-two"), requests_per_minute=2),
        KeyRecord(name="small-input", sha256=digest("sk-small-input"), input_tokens_per_minute=40),
        KeyRecord(name="small-output", sha256=digest("sk-small-output"), output_tokens_per_minute=4),
    ])  # fmt: skip
    app = create_app(settings(keys_file=keys, api_keys=(CLI_KEY,)), [fake_model(reply=" one two three four")])
    with serve_app(app) as url:
        yield url, keys


def post(url: str, key: str, **overrides: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/complete", headers={**VERSION, "x-api-key": key}, json=body(**overrides))


def test_a_key_limited_to_one_model_gets_403_for_another(keyed: tuple[str, Path]) -> None:
    url, _ = keyed
    assert post(url, "sk-only-fake").status_code == 200
    denied = post(url, "sk-only-fake", model="claude-opus-4-6")
    assert denied.status_code == 403
    assert denied.json()["error"] == {
        "type": "permission_error",
        "message": "API key 'only-fake' may not use model 'claude-opus-4-6'",
    }


def test_requests_per_minute(keyed: tuple[str, Path]) -> None:
    url, _ = keyed
    first, second, third = (post(url, "sk-two") for _ in range(3))
    assert first.status_code == second.status_code == 200
    assert first.headers["anthropic-ratelimit-requests-limit"] == "2"
    assert first.headers["anthropic-ratelimit-requests-remaining"] == "1"
    assert second.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert third.status_code == 429
    assert third.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(third.headers["retry-after"]) <= 30
    assert third.headers["anthropic-ratelimit-requests-remaining"] == "0"  # on errors too
    assert third.headers["anthropic-ratelimit-requests-reset"].endswith("Z")


def test_input_tokens_per_minute(keyed: tuple[str, Path]) -> None:
    url, _ = keyed
    # The fake engine counts one token per character: PROMPT is 36 tokens of the 40 allowed.
    assert post(url, "sk-small-input").status_code == 200
    refused = post(url, "sk-small-input")
    assert refused.status_code == 429 and "input-tokens" in refused.json()["error"]["message"]
    assert refused.headers["anthropic-ratelimit-input-tokens-limit"] == "40"
    too_big = post(url, "sk-small-input", prompt=PROMPT + " and much more" * 10)
    assert too_big.status_code == 429 and too_big.headers["retry-after"] == "60"


def test_output_tokens_per_minute_are_charged_as_produced(keyed: tuple[str, Path]) -> None:
    url, _ = keyed
    assert post(url, "sk-small-output", max_tokens_to_sample=4).status_code == 200  # uses all 4
    refused = post(url, "sk-small-output")
    assert refused.status_code == 429 and "output-tokens" in refused.json()["error"]["message"]
    assert refused.headers["anthropic-ratelimit-output-tokens-remaining"] == "0"
    assert refused.headers["anthropic-ratelimit-tokens-remaining"] == "0"


def test_command_line_keys_stay_unlimited(keyed: tuple[str, Path]) -> None:
    url, _ = keyed
    responses = [post(url, CLI_KEY, model="claude-opus-4-6") for _ in range(5)]
    assert all(r.status_code == 200 for r in responses)
    assert not [h for h in responses[-1].headers if h.startswith("anthropic-ratelimit")]


def test_unknown_and_missing_keys_are_401(keyed: tuple[str, Path]) -> None:
    url, _ = keyed
    assert post(url, "sk-nope").status_code == 401
    assert httpx.post(f"{url}/v1/complete", headers=VERSION, json=body()).status_code == 401


def test_keys_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys.toml"
    assert main(["keys", "--keys-file", str(keys), "add", "alice", "--model", "fake", "--rpm", "10"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-tc-") and len(key) > 40
    text = keys.read_text()
    assert key not in text and digest(key) in text
    assert keys.stat().st_mode & 0o077 == 0  # only the owner can read the hashes
    (record,) = read_keys(keys)
    assert (record.name, record.models, record.requests_per_minute) == ("alice", ("fake",), 10)
    assert main(["keys", "--keys-file", str(keys), "add", "alice"]) == 2  # names are unique
    assert main(["keys", "--keys-file", str(keys), "list"]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "10 req/min" in listing and key not in listing
    assert main(["keys", "--keys-file", str(keys), "revoke", "alice"]) == 0
    assert read_keys(keys) == []
    assert main(["keys", "--keys-file", str(keys), "revoke", "alice"]) == 2


def test_a_key_added_by_the_command_works_on_the_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys.toml"
    main(["keys", "--keys-file", str(keys), "add", "bob"])
    key = capsys.readouterr().out.strip()
    with serve_app(create_app(settings(keys_file=keys), [fake_model()])) as url:
        assert post(url, key).status_code == 200
        assert post(url, key[:-1] + "x").status_code == 401


def test_the_server_applies_keys_file_changes_from_the_next_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys.toml"
    main(["keys", "--keys-file", str(keys), "add", "alice"])
    alice = capsys.readouterr().out.strip()
    with serve_app(create_app(settings(keys_file=keys), [fake_model()])) as url:
        assert post(url, alice).status_code == 200
        main(["keys", "--keys-file", str(keys), "add", "bob", "--rpm", "5"])
        bob = capsys.readouterr().out.strip()
        assert post(url, bob).headers["anthropic-ratelimit-requests-limit"] == "5"
        main(["keys", "--keys-file", str(keys), "revoke", "alice"])
        assert post(url, alice).status_code == 401

        (record,) = read_keys(keys)  # new limits for a known key take effect too
        write_keys(keys, [record.model_copy(update={"requests_per_minute": 1})])
        assert post(url, bob).headers["anthropic-ratelimit-requests-limit"] == "1"
        assert post(url, bob).status_code == 429

        keys.write_text("[[keys]]\nname = 'broken'\n")  # invalid: the keys read before stay
        assert post(url, bob).status_code == 429  # still bob's bucket, not a 401
        assert "keeping the 1 keys read before" in caplog.text

        keys.unlink()  # no file: nobody gets in, the server does not become open
        assert post(url, bob).status_code == 401
        assert httpx.post(f"{url}/v1/complete", headers=VERSION, json=body()).status_code == 401


def test_an_empty_keys_file_still_requires_a_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    write_keys(keys, [])
    with serve_app(create_app(settings(keys_file=keys), [fake_model()])) as url:
        assert httpx.post(f"{url}/v1/complete", headers=VERSION, json=body()).status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200


def test_changed_limits_apply_from_the_next_admission_and_keep_what_was_used() -> None:
    limiter = Limiter()
    old = KeyRecord(name="k", sha256=digest("sk-k"), requests_per_minute=100, output_tokens_per_minute=10)
    new = old.model_copy(update={"requests_per_minute": 1, "output_tokens_per_minute": 20})
    limiter.admit(old, 0)
    limiter.charge_output(old, 30)  # 20 output tokens in debt
    with pytest.raises(RateLimited) as over:  # the new record: rpm 1 (1 left), output still in debt
        limiter.admit(new, 0)
    assert "output-tokens" in str(over.value)
    # A request admitted under the old record finishes and reports: that must not restore the old limits.
    limiter.charge_output(old, 0)
    assert limiter.headers(old)["anthropic-ratelimit-requests-limit"] == "1"


def test_a_tightened_request_limit_holds_while_old_requests_finish() -> None:
    limiter = Limiter()
    old = KeyRecord(name="k", sha256=digest("sk-k"), requests_per_minute=100)
    new = old.model_copy(update={"requests_per_minute": 1})
    limiter.admit(old, 0)
    limiter.admit(new, 0)  # the one request a minute of the new limit
    limiter.charge_output(old, 1)  # earlier requests finishing
    limiter.headers(old)
    with pytest.raises(RateLimited):
        limiter.admit(new, 0)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["a", "a"], "a key named 'a' exists already"),
        (["cli-key-1"], "names starting with 'cli-key-' are for --api-key"),
    ],
)
def test_key_names_are_unique_and_not_those_of_command_line_keys(
    tmp_path: Path, names: list[str], message: str
) -> None:
    keys = tmp_path / "keys.toml"
    write_keys(keys, [KeyRecord(name=name, sha256=digest(f"sk-{i}")) for i, name in enumerate(names)])
    with pytest.raises(ConfigError, match=message):
        read_keys(keys)
    assert main(["keys", "--keys-file", str(tmp_path / "other.toml"), "add", "cli-key-7"]) == 2
