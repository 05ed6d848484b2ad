"""Files as maecli writes them: whole or not at all, one owner at a time, and a full disk said in one line.

A writer fills a hidden temporary sibling (`.name.tmp<pid>`) and renames it over the target; a crash or a full
disk mid-write leaves the previous version in place and no temporary file. Out of space (ENOSPC, a quota, or the
errors torch and numpy raise instead when a write comes up short on a full file system) becomes `OutOfSpace`:
one line naming the file, the bytes needed when known, and the space left.
"""

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from maecli.errors import ConfigError, MaecliError

LOW_SPACE = 1 << 20  # bytes: a failed write with less than this left on its file system is a full disk


class OutOfSpace(MaecliError):
    """A write failed because its file system is full (exit code 1)."""


def is_full(err: BaseException, path: Path) -> bool:
    """Did a write to `path` fail for lack of space? Judged while the partial file still takes its space."""
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return isinstance(err, (OSError, RuntimeError)) and shutil.disk_usage(path.parent).free < LOW_SPACE
    except OSError:
        return False


def out_of_space(path: Path, err_text: str, partial: int = 0) -> OutOfSpace:
    """The one line for a write to `path` that failed for lack of space: the bytes needed when the error says, and
    the space left once the `partial` bytes already written are deleted."""
    requested = re.search(r"(\d+) requested", err_text)  # numpy: "718848 requested and 184192 written"
    need = f", needs {int(requested[1]):,} bytes" if requested else ""
    try:
        left = f"{shutil.disk_usage(path.parent).free + partial:,} bytes free"
        if os.statvfs(path.parent).f_favail == 0:  # a file system can run out of inodes (files) with bytes to spare
            left += ", but no inode for another file or folder"
    except OSError:
        left = "free space unknown"
    return OutOfSpace(f"{path}: no space left on the device ({left}{need}); free some space and run the same command again")


@contextmanager
def atomic_write(path: Path | str) -> Iterator[Path]:
    """`with atomic_write(path) as tmp:` write `tmp` in the block; it becomes `path` when the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if not is_full(err, path):
            raise
        # the partial file may still be open in the writer's frames (held by this traceback): count it as freed
        full = out_of_space(path, str(err), tmp.stat().st_size if tmp.exists() else 0)
        raise full from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path | str, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path | str, obj: Any, compact: bool = False) -> None:
    write_text(path, (json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=2)) + "\n")


def read_json(path: Path, default: Any) -> Any:
    """A JSON file this tool wrote (atomically, so whole or absent), or `default` when there is none."""
    return json.loads(path.read_text()) if path.exists() else default


def append_line(path: Path, line: str) -> None:
    """Append one line to a log (metrics): not atomic, so readers drop a torn last line."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as err:
        if is_full(err, path):
            raise out_of_space(path, str(err)) from None
        raise


def read_lines(path: Path, keep: Any = None) -> list[dict[str, Any]]:
    """A JSON-lines log as dicts, dropping a torn line (a kill mid-append) and, with `keep`, rows it rejects."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and (keep is None or keep(row)):
            rows.append(row)
    return rows


def keep_lines(path: Path, keep: Any) -> list[dict[str, Any]]:
    """Rewrite a JSON-lines log with the rows `keep` accepts (a resumed run drops what a killed one logged past its
    checkpoint, and any torn line); returns them."""
    rows = read_lines(path, keep)
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


@contextmanager
def locked(lock: Path) -> Iterator[str | None]:
    """Try to hold the lock file `lock` while the block runs. Yields None when this process holds it, else who does
    (pid, host, start time), holding nothing. The lock is the operating system's (flock), so a killed holder leaves
    nothing stale behind: the next process takes it. A holder that ends deletes the file while still holding it;
    a process that locked the file just before it went looks again, so two never hold one path."""
    while True:
        with open(lock, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                yield f.read().strip() or "another process"
                return
            try:
                if os.stat(lock).st_ino != os.fstat(f.fileno()).st_ino:
                    continue  # deleted by its last holder after we opened it: lock the new one
            except FileNotFoundError:
                continue
            try:
                f.seek(0)
                f.truncate()
                f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
                f.flush()  # a full disk fails here
                yield None
            finally:
                lock.unlink(missing_ok=True)  # still held: nobody else can have locked this file meanwhile
            return  # closing the file releases the lock


@contextmanager
def owned(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder` (its `.lock`) for this process: a second owner stops at once with one line naming the first."""
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder / ".lock") as holder:
        if holder is not None:
            raise ConfigError(f"{folder}: in use by {holder}; wait for it to finish, or use another {what}")
        yield
