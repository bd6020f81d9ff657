"""Opaque ids in the style of Anthropic's: a prefix, `01`, then 22 base58 characters."""

from __future__ import annotations

import secrets

_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def new_id(prefix: str) -> str:
    return f"{prefix}_01" + "".join(secrets.choice(_BASE58) for _ in range(22))
