"""The tcserve command line."""

from tcserve.cli.main import main

__all__ = ["main"]
