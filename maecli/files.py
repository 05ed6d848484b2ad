"""Atomic file writes: every file maecli writes appears whole or not at all.

A writer fills a hidden temporary sibling (`.name.tmp<pid>`) and renames it over the target; a crash
mid-write leaves the previous version in place and, at worst, a temporary file that cleanup may remove.
"""

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_write(path: Path | str) -> Iterator[Path]:
    """`with atomic_write(path) as tmp:` write `tmp` in the block; it becomes `path` when the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path | str, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path | str, obj: Any, compact: bool = False) -> None:
    write_text(path, (json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=2)) + "\n")
