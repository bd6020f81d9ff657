"""The repository's own documents stay true to the code, and stand on their own.

docs/wire.md is the contract users read; these checks catch the drifts that a
code change can cause silently: a message reworded, an error type added, a
version accepted. The path check keeps every document and comment free of
folders outside the repository and of one machine's paths.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tcserve.api import errors
from tcserve.api.protocol import SUPPORTED_VERSIONS
from tcserve.core import transcript

ROOT = Path(__file__).resolve().parent.parent
WIRE = ROOT / "docs" / "wire.md"

FOREIGN_PATH = re.compile(r"/opt/|/work/|/home/|/root/|/Users/|shared folder|\.\./shared|spec/text-completions")
"""Paths that exist only on some machine, and the old pointer to the contract outside the repository."""


def _documents() -> list[Path]:
    """Everything a user or a reader of the code sees, but not bench/results: a recorded
    run names the machine's own paths on purpose (that is what it records)."""
    files = [ROOT / name for name in ("README.md", "Makefile", "bench/README.md", "tests/vllm-requirements.txt")]
    files += sorted((ROOT / "docs").glob("*.md"))
    files += sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    files += sorted((ROOT / "bench").glob("*.sh"))
    return files


@pytest.mark.parametrize("path", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_document_names_a_path_outside_the_repository(path: Path) -> None:
    found = [
        f"{number}: {line.strip()}"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if FOREIGN_PATH.search(line)
    ]
    assert found == []


def test_the_readme_points_to_the_contract_and_to_torchs_cpu_index() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "[docs/wire.md](docs/wire.md)" in readme
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in readme


def _wire() -> str:
    return WIRE.read_text(encoding="utf-8")


def test_wire_doc_quotes_the_prompt_rule_messages_exactly() -> None:
    for message in (transcript.BAD_START, transcript.BAD_END):
        assert f"`{message.replace(chr(10), chr(92) + 'n')}`" in _wire()


def _api_errors() -> list[type[errors.APIError]]:
    found: list[type[errors.APIError]] = []
    pending: list[type[errors.APIError]] = [errors.APIError]
    while pending:
        error = pending.pop()
        found.append(error)
        pending += error.__subclasses__()
    return found


@pytest.mark.parametrize("error", _api_errors(), ids=lambda e: e.__name__)
def test_wire_doc_has_a_row_for_every_status_and_error_type(error: type[errors.APIError]) -> None:
    assert f"| {error.status} | `{error.type}` |" in _wire()


@pytest.mark.parametrize("version", sorted(SUPPORTED_VERSIONS))
def test_wire_doc_explains_every_accepted_version(version: str) -> None:
    assert f"| `{version}` |" in _wire()
