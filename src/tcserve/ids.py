"""Opaque ids in the style of Anthropic's: a prefix, `01`, then 22 base58 characters."""

from __future__ import annotations

import secrets

_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def new_id(prefix: str) -> str:
    return f"{prefix}_01" + random_base58(22)


def random_base58(length: int) -> str:
    """Random characters without look-alikes (no 0, O, I, l): ids and API keys."""
    return "".join(secrets.choice(_BASE58) for _ in range(length))
