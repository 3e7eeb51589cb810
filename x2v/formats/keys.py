"""Summaries of long state-dict key lists, for messages a person can read."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable


def key_pattern(key: str) -> str:
    """``blocks.12.self_attn.q.weight`` -> ``blocks.N.self_attn.q.weight``."""
    return re.sub(r"\.\d+(?=\.|$)", ".N", key)


def summarize_keys(keys: Iterable[str], limit: int = 12) -> str:
    """Keys grouped by pattern with their counts, at most ``limit`` patterns."""
    counts = Counter(key_pattern(k) for k in keys)
    parts = [f"{p} (x{n})" if n > 1 else p for p, n in sorted(counts.items())]
    more = f", ... and {len(parts) - limit} more patterns" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more
