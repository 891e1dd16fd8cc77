"""Text that came with an upload (its key, FFmpeg's messages), made safe to show a person.

S3 keys may hold any Unicode: C1 controls (U+0080–U+009F, which some terminals obey as escape
sequences) and bidirectional overrides (U+202E shows `evil<U+202E>gpj.mp4` as `evilmp4.jpg`) make a key
look like another. Every character that is not printable is shown as its `\\uXXXX` escape instead,
so a moderator sees exactly which key a verdict is for.
"""
from __future__ import annotations

import json
from typing import Any


def _escape(c: str) -> str:
    code = ord(c)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def visible(text: str) -> str:
    """`text` with every non-printable character (controls, format characters such as bidi overrides
    and zero-width marks, line and paragraph separators, unassigned code points) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def json_for_terminal(value: Any, **dumps: Any) -> str:
    """JSON that keeps readable non-ASCII (accents, CJK) but escapes what `visible` escapes; the
    result is still valid JSON that decodes to `value` (outside strings only spaces and newlines occur)."""
    text = json.dumps(value, ensure_ascii=False, **dumps)
    return "".join(c if c.isprintable() or c == "\n" else (
        _escape(c) if ord(c) <= 0xFFFF else json.dumps(c)[1:-1]) for c in text)
