"""JSON (and YAML) text as data the monitor can write out again: no lone surrogates.

JSON's "\\ud800" escape decodes to a lone UTF-16 surrogate, a str that no UTF-8 writer takes: a run
name holding one made every later write of it fail (alerts.jsonl, the console, the report, a
scrape). Each is replaced by U+FFFD at the read, where the text enters the monitor, in keys and
values alike. The walk runs only when the text has such an escape (one C-level search otherwise).
"""

from __future__ import annotations

import json
import re
from typing import Any

_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a surrogate's escape: "\ud800" .. "\udfff"
_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE = re.compile(r"[\ud800-\udfff]")  # after decoding, the pairs are whole characters: these are lone


def loads(text: str | bytes) -> Any:
    """json.loads, lone surrogates replaced (U+FFFD)."""
    data = json.loads(text)
    escaped = _ESCAPE.search(text) if isinstance(text, str) else _ESCAPE_BYTES.search(text)
    return clean(data) if escaped else data


def clean(data: Any) -> Any:
    """`data` (parsed JSON or YAML) with lone surrogates in its strings replaced (U+FFFD)."""
    if isinstance(data, str):
        return _LONE.sub("\ufffd", data)
    if isinstance(data, dict):
        return {clean(k): clean(v) for k, v in data.items()}
    if isinstance(data, list):
        return [clean(v) for v in data]
    return data
