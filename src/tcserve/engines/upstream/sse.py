"""Server-sent events as an upstream sends them: lines in, each event's data out."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The `data` of each event: its `data:` lines joined with newlines, given at the
    blank line that ends it (or at the end of the input). `event:`, `id:`, `retry:`
    and comment lines are dropped: every upstream API here repeats the event's name
    in its JSON."""
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)
