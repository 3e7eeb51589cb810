"""JSON with comments and trailing commas, as LightX2V's example configs are written."""

from __future__ import annotations

import json
import re
from pathlib import Path

# A string literal, a // or /* */ comment, or a comma before a closing bracket; strings are kept as they are.
_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/|,(?=\s*[}\]])', re.S)


def loads(text: str) -> dict:
    return json.loads(_TOKEN.sub(lambda m: m.group(0) if m.group(0).startswith('"') else "", text))


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        return loads(path.read_text())
    except json.JSONDecodeError as e:
        from x2v.errors import X2VError

        raise X2VError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
