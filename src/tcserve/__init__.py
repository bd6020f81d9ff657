"""tcserve: Anthropic's Text Completions API on local models."""

__version__ = "0.1.0"
