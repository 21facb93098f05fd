"""Reading JSON-lines files: user files with errors that name the file and line, and logs.

The corpus importer and the question loader read user files one JSON object per line; a
problem anywhere must come back as one message ``FILE:LINE: problem``, never a traceback from
inside the decoder. `records` does the reading; callers raise their own error class for
problems they find in a record, with the line number it yields. `log_entries` reads the
append-only logs a run writes itself (metrics, publications), where a kill can tear the last
line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def records(
    path: str | os.PathLike, error: Callable[[str], Exception]
) -> Iterator[tuple[int, Any]]:
    """``(line number, decoded value)`` of every non-blank line of ``path``, in order.

    Text that is not UTF-8 and lines that are not JSON raise ``error("FILE:LINE: problem")``.
    """
    source = Path(path)
    with open(source, encoding="utf-8") as handle:
        line_no = 0
        while True:
            try:
                line = handle.readline()
            except UnicodeDecodeError as err:
                raise error(f"{source}:{line_no + 1}: not UTF-8 text ({err})") from None
            if not line:
                return
            line_no += 1
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{source}:{line_no}: malformed JSON: {err}") from None
            yield line_no, value


def log_entries(path: str | os.PathLike) -> list[Any]:
    """The decoded lines of an append-only JSON-lines log (``[]`` when it does not exist),
    skipping lines that do not decode: a kill mid-append leaves a torn line."""
    source = Path(path)
    if not source.is_file():
        return []
    out = []
    for line in source.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


__all__ = ["log_entries", "records"]
