"""Who may call, how much, and what they used: keys, per-key limits and the usage ledger."""
