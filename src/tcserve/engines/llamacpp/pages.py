"""Memory that llama.cpp makes resident before anything uses it, given back.

Creating a context allocates its KV cache (276 MiB for Gemma 3 270M at 16 slots x
2048 tokens) and clears it to zero, so every page of it is resident from the start,
although a sequence only ever writes its own cells: a lone stream uses one slot's
cells of sixteen, and the other fifteen would sit in memory as zeros. Loading the
model maps the GGUF file with MAP_POPULATE, so its pages are resident too while the
cache is cleared, and the two add up to the process's peak.

Both are given back without changing a byte the program sees:

- `drop_file_pages`: the GGUF's pages, after the model is loaded and before the
  context is created. The mapping is shared and read-only, so the page cache holds
  the same bytes, and the first decode maps them again (minor faults, no reads).
- `give_back_zero_pages`: the pages of the memory mapped while the context was
  created that hold nothing but zeros. That memory is private and anonymous (glibc
  gives an allocation this large a mapping of its own), and a page dropped with
  `madvise(MADV_DONTNEED)` there reads as zeros again and is made resident only
  when next written. Pages with any other byte (glibc's chunk headers) are kept.

A page that another thread wrote between the check and the drop would lose that
write. So each slice is checked right before it is dropped, with the GIL held
(`ctypes.PyDLL`) and thread switches held off (`sys.setswitchinterval`): no Python
thread runs while the pages are checked and dropped. Only the memory
mapped while this context was created is looked at, one creation at a time
(`native.Model` holds a lock). What could still write there unseen is code that
runs without the GIL into a buffer mapped in that very instant, right next to the
context's memory (another engine growing its logit buffer, a socket read), within
the microseconds between a slice's check and its drop.

Linux only (it reads /proc/self/maps); elsewhere nothing is given back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from collections.abc import Sequence
from pathlib import Path

MADV_DONTNEED = 4
PAGE = mmap.PAGESIZE
SMALLEST = 16 << 20
"""New ranges below this size are left alone: a context's cache is tens of MiB and
more, and small ranges are where other threads' allocations would be."""
SLICE = 1 << 20
"""Bytes checked and dropped at a time."""

Range = tuple[int, int]
"""[start, end) addresses."""

_LINUX = sys.platform.startswith("linux")


def _libc() -> ctypes.PyDLL | None:
    """libc's functions called with the GIL held (a ctypes.CDLL call would release it);
    None where libc cannot be loaded (nothing is given back then)."""
    try:
        libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return libc


def mappings() -> list[tuple[Range, str, str]]:
    """The process's mappings: address range, permissions and path ("" for anonymous memory)."""
    if not _LINUX:
        return []
    out = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(address, 16) for address in fields[0].split("-"))
            out.append(((start, end), fields[1], fields[5].rstrip("\n") if len(fields) > 5 else ""))
    return out


def anonymous_ranges() -> list[Range]:
    """The private writable mappings without a file."""
    return [span for span, permissions, path in mappings() if permissions == "rw-p" and not path]


def new_ranges(before: Sequence[Range], after: Sequence[Range]) -> list[Range]:
    """The parts of `after` that no range of `before` covers (the kernel merges a new
    mapping with a neighbour of the same kind, so a new buffer may extend an old range)."""
    out: list[Range] = []
    for span in after:
        pieces = [span]
        for old_start, old_end in before:
            pieces = [
                piece
                for start, end in pieces
                for piece in ((start, min(end, old_start)), (max(start, old_end), end))
                if piece[0] < piece[1]
            ]
        out.extend(pieces)
    return out


def _zero(libc: ctypes.PyDLL, start: int, size: int) -> bool:
    """Whether [start, start + size) holds only zeros: its first byte is zero and every
    byte equals the one after it."""
    return ctypes.c_ubyte.from_address(start).value == 0 and libc.memcmp(start, start + 1, size - 1) == 0


def _residency(libc: ctypes.PyDLL, start: int, size: int) -> bytes | None:
    """One byte a page of [start, start + size), 1 where the page is resident, or None
    when a page of it is no longer mapped (mincore fails then)."""
    vector = ctypes.create_string_buffer(-(-size // PAGE))
    if libc.mincore(start, size, vector) != 0:
        return None
    return vector.raw.translate(_LOW_BIT)


_LOW_BIT = bytes(value & 1 for value in range(256))
"""mincore's flag of a resident page is the low bit of its byte."""


def _zero_runs(libc: ctypes.PyDLL, start: int, end: int) -> list[Range]:
    """[start, end) whole when it holds only zeros, else its pages that do."""
    if _zero(libc, start, end - start):
        return [(start, end)]
    return [(page, page + PAGE) for page in range(start, end, PAGE) if _zero(libc, page, PAGE)]


def give_back_zero_pages(before: Sequence[Range]) -> int:
    """Drop the all-zero pages of the anonymous memory mapped since `before` was taken
    (ranges of at least `SMALLEST` bytes), a slice at a time. Returns the bytes given
    back that were resident (reading a page that was never written makes it look
    resident, so this is counted before the check)."""
    libc = _libc() if _LINUX else None
    if libc is None:
        return 0
    dropped = 0
    spans = [span for span in new_ranges(before, anonymous_ranges()) if span[1] - span[0] >= SMALLEST]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e6)  # no other Python thread runs between a check and its drop
    try:
        for start, end in spans:  # mappings begin and end on page boundaries
            for piece in range(start, end, SLICE):
                piece_end = min(piece + SLICE, end)
                resident = _residency(libc, piece, piece_end - piece)
                if resident is None:
                    continue  # unmapped since /proc/self/maps was read
                for run_start, run_end in _zero_runs(libc, piece, piece_end):
                    if libc.madvise(run_start, run_end - run_start, MADV_DONTNEED) == 0:
                        dropped += resident[(run_start - piece) // PAGE : (run_end - piece) // PAGE].count(1) * PAGE
    finally:
        sys.setswitchinterval(interval)
    return dropped


def drop_file_pages(path: Path) -> int:
    """Unmap the resident pages of `path`'s shared read-only mappings from this process
    (they stay in the page cache, and come back on the next access). Returns the bytes
    of the mappings advised."""
    libc = _libc() if _LINUX else None
    if libc is None:
        return 0
    name, dropped = str(path.resolve()), 0
    for (start, end), permissions, mapped in mappings():
        if mapped == name and permissions == "r--s" and libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            dropped += end - start
    return dropped
