"""Giving back the pages llama.cpp makes resident before use (`pages.py`): only pages
of zeros, only in memory mapped since the snapshot, and the bytes read the same."""

from __future__ import annotations

import ctypes
import json
import mmap
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcserve.engines.llamacpp import pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")

MIB = 1 << 20


def resident(start: int, size: int) -> int:
    """Bytes of the pages of [start, start + size) resident in this process (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    vector = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
    assert libc.mincore(start, size, vector) == 0, ctypes.get_errno()
    return sum(byte & 1 for byte in vector.raw) * mmap.PAGESIZE


def rss_of_file(path: Path) -> int:
    """Bytes of `path`'s mappings resident in this process (smaps' Rss: mincore would
    tell the page cache's)."""
    name, inside, total = str(path.resolve()), False, 0
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                inside = fields[-1] == name
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


class Region:
    """A private anonymous mapping, its address and a view of its bytes."""

    def __init__(self, size: int) -> None:
        self.memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.size = size
        self.address = ctypes.addressof((ctypes.c_char * size).from_buffer(self.memory))

    def close(self) -> None:
        self.memory.close()


@pytest.fixture
def region() -> Iterator[Region]:
    before = pages.anonymous_ranges()
    made = Region(24 * MIB)
    made.before = before  # type: ignore[attr-defined]
    yield made
    made.close()


def test_new_ranges_are_what_no_earlier_range_covers() -> None:
    before = [(100, 200), (300, 400)]
    after = [(0, 50), (100, 250), (280, 420), (500, 600)]
    assert pages.new_ranges(before, after) == [(0, 50), (200, 250), (280, 300), (400, 420), (500, 600)]
    assert pages.new_ranges(after, after) == []


def test_only_pages_of_zeros_are_given_back_and_every_byte_reads_the_same(region: Region) -> None:
    page = mmap.PAGESIZE
    written = {3 * page + 17: 0x5A, 5 * MIB + 1: 0x01, 20 * MIB + page - 1: 0xFF}  # one byte in three pages
    region.memory.write(bytes(region.size))  # all of it resident, as llama.cpp's clear makes the cache
    for offset, value in written.items():
        region.memory[offset] = value
    assert resident(region.address, region.size) >= region.size - page

    dropped = pages.give_back_zero_pages(region.before)  # type: ignore[attr-defined]

    assert region.size - len(written) * page <= dropped <= region.size
    assert resident(region.address, region.size) <= len(written) * page
    expected = bytearray(region.size)
    for offset, value in written.items():
        expected[offset] = value
    assert region.memory[:] == bytes(expected)


def test_memory_mapped_before_the_snapshot_is_left_alone(region: Region) -> None:
    region.memory.write(bytes(region.size))
    assert pages.give_back_zero_pages(pages.anonymous_ranges()) == 0
    assert resident(region.address, region.size) >= region.size - mmap.PAGESIZE


def test_small_new_ranges_are_left_alone() -> None:
    before = pages.anonymous_ranges()
    small = Region(pages.SMALLEST // 2)
    try:
        small.memory.write(bytes(small.size))
        pages.give_back_zero_pages(before)
        assert resident(small.address, small.size) >= small.size - mmap.PAGESIZE
    finally:
        small.close()


def test_a_shared_read_only_file_mapping_is_dropped_and_still_reads_the_same(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    content = bytes(range(256)) * (8 * MIB // 256)
    path.write_bytes(content)
    with path.open("rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    try:
        assert mapped[:] == content  # touches every page
        assert rss_of_file(path) == len(content)
        assert pages.drop_file_pages(path) == len(content)
        assert rss_of_file(path) == 0
        assert mapped[:] == content
    finally:
        mapped.close()


MEASURE = """
import hashlib, json, sys
import numpy as np
from tcserve.engines.llamacpp import native, pages
from tcserve.engines.llamacpp.engine import default_model_path
if sys.argv[1] == "kept":
    pages.give_back_zero_pages = lambda before: 0
    pages.drop_file_pages = lambda path: 0
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024
rss = status("VmRSS:")
params = native.ContextParams(slots=16, slot_context=2048, batch_tokens=256, threads=2)
model = native.Model(default_model_path(), params)
created = {"rss": status("VmRSS:") - rss, "peak": status("VmHWM:") - rss}
tokens = model.vocab.tokenize("The quick brown fox jumps over the lazy dog, and then")
for slot in (0, 15):
    model.batch.clear()
    for i, token in enumerate(tokens):
        model.batch.add(token, i, slot, i == len(tokens) - 1)
    assert model.decode() == 0
    created[f"logits {slot}"] = hashlib.blake2b(np.ascontiguousarray(model.logits(len(tokens) - 1)).data).hexdigest()
print(json.dumps(created))
"""


def measure(variant: str) -> dict[str, float | str]:
    out = subprocess.run([sys.executable, "-c", MEASURE, variant], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_a_new_context_holds_no_resident_cache_until_used_and_computes_the_same() -> None:
    given_back, kept = measure("given back"), measure("kept")
    # Gemma 3 270M at 16 x 2048: a 276 MiB cache and 235 MiB of weights.
    assert float(kept["rss"]) > 400 and float(given_back["rss"]) < float(kept["rss"]) - 300
    assert float(given_back["peak"]) < float(kept["peak"]) - 150
    assert given_back["logits 0"] == kept["logits 0"]
    assert given_back["logits 15"] == kept["logits 15"]


def test_nothing_is_given_back_where_libc_cannot_be_loaded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def missing(*args: object, **kwargs: object) -> None:
        raise OSError("no libc here")

    monkeypatch.setattr(ctypes, "PyDLL", missing)
    before = pages.anonymous_ranges()
    made = Region(24 * MIB)
    try:
        made.memory.write(bytes(made.size))
        assert pages.give_back_zero_pages(before) == 0
        assert pages.drop_file_pages(tmp_path / "absent.gguf") == 0
        assert resident(made.address, made.size) >= made.size - mmap.PAGESIZE
    finally:
        made.close()
