"""Strict readings of what a log on disk holds: numbers in ASCII syntax, and regular files only.

Python's float() and int() also take underscores ("1_000"), the digits of any script ("١٢") and
surrounding whitespace (" 13 "). No logger writes those, so a value spelled that way is damage or
another tool's text: the readers report it instead of reading a number it was never meant to be.
A FIFO, device or socket where a log file is expected would block (or never end) the reader's open()
or read(): the readers refuse them by their stat() mode before opening.
"""

from __future__ import annotations

import re
import stat

# A decimal number as C's printf and Python's str() write it, and the nan/inf spellings they use
# (printf "nan", "-nan", "inf"; str() "nan", "inf"; "%E" upper case): anchored by fullmatch, with no
# nested repetition, so a long value costs one linear pass.
_FLOAT = re.compile(r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|(?i:nan|inf|infinity))")
_WHOLE = re.compile(r"[+-]?[0-9]+")


def ascii_float(s: str) -> float | None:
    """The number `s` spells in ASCII numeric syntax (nothing around it), else None."""
    return float(s) if _FLOAT.fullmatch(s) else None


def ascii_int(s: str) -> int | None:
    """The whole number `s` spells in ASCII digits (a sign allowed, nothing around it), else None.
    Raises ValueError past int()'s digit limit (sys.int_info.default_max_str_digits): the caller's
    report of an unreadable value names it."""
    return int(s) if _WHOLE.fullmatch(s) else None


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def not_regular(mode: int) -> str | None:
    """What a file of this st_mode is when it is not a regular file (to name in an error), else None."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")
