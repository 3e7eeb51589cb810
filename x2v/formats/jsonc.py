"""JSON with comments and trailing commas, as LightX2V's example configs are written."""

from __future__ import annotations

import json
import re
from pathlib import Path

# String literals are matched first so that their contents are kept as they are.
_COMMENT = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/', re.S)
_TRAILING_COMMA = re.compile(r'"(?:\\.|[^"\\])*"|,(?=\s*[}\]])')


def _drop_all_but_strings(pattern: re.Pattern, text: str) -> str:
    return pattern.sub(lambda m: m.group(0) if m.group(0).startswith('"') else "", text)


def loads(text: str) -> dict:
    """Comments go first, so a trailing comma followed by a comment is still found."""
    return json.loads(_drop_all_but_strings(_TRAILING_COMMA, _drop_all_but_strings(_COMMENT, text)))


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        return loads(path.read_text())
    except json.JSONDecodeError as e:
        from x2v.errors import X2VError

        raise X2VError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
