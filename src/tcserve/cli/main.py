"""tcserve serve | models | complete: flags -> Settings -> app, or a small client of a running server."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from tcserve import __version__, logs
from tcserve.accounting.keys import KeyRecord, check_new_name, digest, new_key, read_keys, write_keys
from tcserve.accounting.ledger import LEDGER_FILE, totals
from tcserve.cli.flags import add_settings_flags, given_settings
from tcserve.config import ConfigError, Settings, load_models
from tcserve.core import transcript
from tcserve.errors import validation_message

if TYPE_CHECKING:  # the client commands import httpx when they run: `serve` never needs it (5 MiB resident)
    import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8080"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result: int = args.run(args)
        return result
    except (ConfigError, ClientError) as error:
        print(f"tcserve: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcserve",
        description="Anthropic's Text Completions API (POST /v1/complete) on local models.",
    )
    parser.add_argument("--version", action="version", version=f"tcserve {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="start the server", description=_SERVE_HELP)
    add_settings_flags(serve)
    serve.set_defaults(run=_serve)

    keys = commands.add_parser("keys", help="add, list or revoke API keys in a keys file", description=_KEYS_HELP)
    keys.add_argument("--keys-file", type=Path, required=True, help="the TOML keys file (created if missing)")
    key_commands = keys.add_subparsers(title="actions", required=True, metavar="ACTION", help="what to do")
    add = key_commands.add_parser("add", help="create a key and print it (once)")
    add.add_argument("name", help="a name for the key, shown in logs and usage")
    add.add_argument("--model", action="append", dest="models", help="allow only this model id (repeat); default: all")
    add.add_argument("--rpm", type=int, help="requests per minute (default: no limit)")
    add.add_argument("--input-tpm", type=int, help="input tokens per minute (default: no limit)")
    add.add_argument("--output-tpm", type=int, help="output tokens per minute (default: no limit)")
    add.set_defaults(run=_keys_add)
    listing = key_commands.add_parser("list", help="list the keys (names and limits, never the keys)")
    listing.set_defaults(run=_keys_list)
    revoke = key_commands.add_parser("revoke", help="delete a key")
    revoke.add_argument("name", help="the key's name")
    revoke.set_defaults(run=_keys_revoke)

    usage = commands.add_parser("usage", help="print usage totals per key and model from the ledger")
    usage.add_argument("--data-dir", type=Path, required=True, help="the server's --data-dir")
    usage.add_argument("--since", help="from this time on (ISO 8601, UTC; e.g. 2026-11-01)")
    usage.add_argument("--until", help="before this time (ISO 8601, UTC)")
    usage.add_argument("--key", help="only this key name (`-`: requests made without a key)")
    usage.add_argument("--model", help="only this model id, as the requests named it")
    usage.set_defaults(run=_usage)

    models = commands.add_parser(
        "models", help="list the models of a running server: id, loaded or not, format, size, file"
    )
    _client_flags(models)
    models.set_defaults(run=_models)

    complete = commands.add_parser(
        "complete", help="stream a completion from a running server", description=_COMPLETE_HELP
    )
    complete.add_argument("prompt", help="a question (wrapped in Human/Assistant turns) or a whole transcript")
    complete.add_argument("--model", default="claude-sonnet-4-5", help="model id (default claude-sonnet-4-5)")
    complete.add_argument("--max-tokens", type=int, default=256, help="max_tokens_to_sample (default 256)")
    complete.add_argument("--temperature", type=float, help="0 (greedy) to 1 (default: the server's, 1)")
    complete.add_argument("--top-p", type=float, help="nucleus sampling, 0 to 1")
    complete.add_argument("--top-k", type=int, help="sample from the k likeliest tokens only")
    complete.add_argument("--stop", action="append", help="a stop sequence; repeat for several")
    complete.add_argument("--raw", action="store_true", help="send the prompt as is, without Human/Assistant turns")
    _client_flags(complete)
    complete.set_defaults(run=_complete)
    return parser


_SERVE_HELP = """Start the server. Flags override TCSERVE_* variables, which override defaults.
Without --config the server has one model, the packaged Gemma 3 270M (or --model-path),
which also answers every Claude model id of the SDKs' model list. --models-dir DIR
also serves every *.gguf of DIR, loaded on its first request (which waits up to
--load-timeout, then gets 529), unloaded after --keep-alive seconds idle, within
--max-loaded-models (README, "A folder of models")."""

_KEYS_HELP = """Manage the keys file that `tcserve serve --keys-file` reads. Keys are stored as
SHA-256 hashes; `add` prints the new key once. A running server applies changes
from its next request on."""

_COMPLETE_HELP = """Stream a completion from a running tcserve to the terminal. A bare prompt is
wrapped as "\\n\\nHuman: PROMPT\\n\\nAssistant:". Like the SDKs, it reads ANTHROPIC_BASE_URL
and ANTHROPIC_API_KEY."""


def _keys_add(args: argparse.Namespace) -> int:
    records = read_keys(args.keys_file)
    try:
        check_new_name(args.name, records)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    key = new_key()
    record = KeyRecord(
        name=args.name,
        sha256=digest(key),
        models=tuple(args.models) if args.models else None,
        requests_per_minute=args.rpm,
        input_tokens_per_minute=args.input_tpm,
        output_tokens_per_minute=args.output_tpm,
    )
    write_keys(args.keys_file, [*records, record])
    print(key)
    print(
        f"(key {args.name!r} added to {args.keys_file}; it is not stored and will not be shown again)", file=sys.stderr
    )
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    for record in read_keys(args.keys_file):
        models = ",".join(record.models) if record.models else "all models"
        limits = [f"{value} {unit}" for value, unit in ((record.requests_per_minute, "req/min"),
                  (record.input_tokens_per_minute, "input tok/min"),
                  (record.output_tokens_per_minute, "output tok/min")) if value]  # fmt: skip
        print(f"{record.name:<20} {record.sha256[:12]}…  {models}  {', '.join(limits) or 'no limits'}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    records = read_keys(args.keys_file)
    kept = [record for record in records if record.name != args.name]
    if len(kept) == len(records):
        raise ConfigError(f"no key named {args.name!r} in {args.keys_file}")
    write_keys(args.keys_file, kept)
    print(f"revoked {args.name!r}", file=sys.stderr)
    return 0


def _usage(args: argparse.Namespace) -> int:
    path = args.data_dir / LEDGER_FILE
    if not path.exists():
        raise ConfigError(f"no usage ledger in {args.data_dir}")
    rows = totals(path, args.since, args.until, key=args.key, model=args.model)
    print(f"{'key':<20} {'model':<32} {'requests':>9} {'input tokens':>13} {'output tokens':>14}")
    for key, model, requests, input_tokens, output_tokens in rows:
        print(f"{key:<20} {model:<32} {requests:>9} {input_tokens:>13} {output_tokens:>14}")
    if len(rows) > 1:
        requests = sum(row[2] for row in rows)
        input_tokens = sum(row[3] for row in rows)
        output_tokens = sum(row[4] for row in rows)
        print(f"{'total':<53} {requests:>9} {input_tokens:>13} {output_tokens:>14}")
    return 0


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-url",
        default=os.environ.get("ANTHROPIC_BASE_URL", DEFAULT_BASE_URL),
        help=f"server URL (env ANTHROPIC_BASE_URL, default {DEFAULT_BASE_URL})",
    )
    parser.add_argument(
        "--api-key", default=os.environ.get("ANTHROPIC_API_KEY"), help="key to send (env ANTHROPIC_API_KEY)"
    )


def _serve(args: argparse.Namespace) -> int:
    from tcserve.api.app import create_app
    from tcserve.api.server import serve

    try:
        settings = Settings(**given_settings(args))
    except ValidationError as error:
        raise ConfigError(validation_message(error.errors())) from None
    models = load_models(settings)  # config mistakes end here, before logging is set up
    logs.setup(settings.log_level)
    app = create_app(settings, models)
    return serve(app, settings.host, settings.port, settings.shutdown_timeout, settings.header_timeout)


class ClientError(Exception):
    pass


def _client(args: argparse.Namespace) -> httpx.Client:
    import httpx

    headers = {"anthropic-version": "2023-06-01"}
    if args.api_key:
        headers["x-api-key"] = args.api_key
    return httpx.Client(base_url=args.base_url.rstrip("/"), headers=headers, timeout=httpx.Timeout(600, connect=5))


def _models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        body = _json_or_raise(_request(client, "GET", "/v1/models", params={"limit": 1000}))
    print(f"{'id':<32} {'loaded':<7} {'format':<9} {'size':>10}  file")
    for model in body["data"]:
        loaded = {True: "yes", False: "no"}.get(model.get("loaded"), "?")  # a server older than this client: "?"
        size = model.get("size_bytes")
        shown = f"{size / 2**20:.1f} MiB" if isinstance(size, int) else "-"
        print(f"{model['id']:<32} {loaded:<7} {model.get('format', '?'):<9} {shown:>10}  {model.get('file') or '-'}")
    return 0


def _complete(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "model": args.model,
        "prompt": args.prompt if args.raw else transcript.wrap_bare_prompt(args.prompt),
        "max_tokens_to_sample": args.max_tokens,
        "stream": True,
    }
    for flag, field in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                        ("stop", "stop_sequences")):  # fmt: skip
        if getattr(args, flag) is not None:
            body[field] = getattr(args, flag)
    import httpx

    try:
        with _client(args) as client, client.stream("POST", "/v1/complete", json=body) as response:
            _print_stream(response)
    except httpx.TransportError as error:
        raise ClientError(f"connection to {args.base_url} failed: {error}") from None
    return 0


def _print_stream(response: httpx.Response) -> None:
    if response.status_code != 200:
        response.read()
        _json_or_raise(response)
    event = ""
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data = json.loads(line[5:])
            if event == "error":
                raise ClientError(f"stream ended with an error: {data['error']['message']}")
            if event == "completion":
                sys.stdout.write(data["completion"])
                sys.stdout.flush()
    sys.stdout.write("\n")


def _request(client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    import httpx

    try:
        return client.request(method, path, **kwargs)
    except httpx.TransportError as error:
        raise ClientError(f"connection to {client.base_url} failed: {error}") from None


def _json_or_raise(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        raise ClientError(f"{response.status_code} from the server, and not JSON") from None
    if response.status_code != 200:
        error = body.get("error", {})
        raise ClientError(f"{response.status_code} {error.get('type')}: {error.get('message')}")
    return body
