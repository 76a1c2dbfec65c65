"""Logged values made safe to print on a terminal and to open in a spreadsheet.

Every logged field (user, tags, model, error text, path) comes from a client or an upstream and is
hostile when printed: an escape sequence can retitle or clear the terminal, a carriage return can forge
a line. Human-readable output shows control characters (C0, DEL, C1) and the Unicode bidirectional
controls as visible escapes instead. CSV cells starting with a formula character are prefixed with a
single quote (OWASP's CSV injection advice); JSON output stays exact JSON.
"""

from __future__ import annotations

import re

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _visible(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_text(value: object) -> str:
    """`value` as text with every control character shown as an escape (\\x1b, \\r, \\u202e ...)."""
    return _CONTROL.sub(_visible, str(value))


def csv_cell(value: str) -> str:
    """A text cell a spreadsheet will not run as a formula."""
    return "'" + value if value.startswith(FORMULA_START) else value
