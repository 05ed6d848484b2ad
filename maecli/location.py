"""Where a frame store lives: a local folder, or a URL (s3://, gs://, https://, ...) read and written through fsspec.

A remote store is read through a local cache of whole shard files, bounded in size: a shard is downloaded once
(to a temporary name, then renamed, so loader threads and ranks on one machine share it), checked against the
size its video's record gives, and the least recently used shards are deleted when the cache grows past its bound.
Writes to a URL are single uploads (one PUT each on object storage), so a reader sees a whole file or none.

    MAECLI_CACHE     the cache folder (default ~/.cache/maecli); each remote store gets a sub-folder of it
    MAECLI_CACHE_GB  its bound per store, in GB (default 50)

Credentials and endpoints are the storage client's own: for S3, the AWS variables or profile
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for S3-compatible servers), as for any boto client.
"""

import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from maecli.errors import ConfigError, MaecliError
from maecli.files import write_text

CLIENTS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}  # pip packages


def is_url(where: str | Path) -> bool:
    return "://" in str(where)


def cache_root() -> Path:
    return Path(os.environ.get("MAECLI_CACHE") or Path.home() / ".cache" / "maecli")


class Location:
    """A store's folder: `read_text(s)`, `sizes` (a folder's files), `write_text`, `local` (files as local paths,
    downloaded into the cache for a URL) and `publish` (staged files uploaded). `staging` is where `extract` writes
    before publishing: the folder itself when it is local."""

    def __init__(self, where: str | Path) -> None:
        self.name = str(where).rstrip("/")
        self.remote = is_url(where)
        if self.remote:
            self.fs = self._filesystem()
            self.cache = cache_root() / "stores" / hashlib.blake2b(self.name.encode(), digest_size=8).hexdigest()
            self.staging = self.cache / "staging"
            self.limit = float(os.environ.get("MAECLI_CACHE_GB") or 50) * 1e9
        else:
            self.staging = Path(where)

    def __str__(self) -> str:
        return self.name

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "fs"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.remote:
            self.fs = self._filesystem()

    def _filesystem(self) -> Any:
        import fsspec

        protocol = self.name.split("://", 1)[0]
        try:
            return fsspec.filesystem(protocol, skip_instance_cache=True)  # credentials and endpoint as the environment says now
        except ImportError:
            package = CLIENTS.get(protocol, f"an fsspec implementation for {protocol}://")
            raise ConfigError(f"{self.name}: reading {protocol}:// needs {package} (pip install {package})") from None
        except ValueError as err:
            raise ConfigError(f"{self.name}: {err}") from None

    def url(self, rel: str) -> str:
        return f"{self.name}/{rel}"

    @contextmanager
    def _remote(self, rel: str) -> Iterator[None]:
        """The storage client's failures as one line naming the URL: no credentials, refused, unreachable."""
        try:
            yield
        except FileNotFoundError:
            raise
        except PermissionError as err:
            raise ConfigError(f"{self.url(rel)}: access denied ({_first_line(err)}); check the credentials' rights on this bucket") from None
        except Exception as err:  # the clients raise their own classes (botocore, aiohttp, google-auth): judged by name
            kind = type(err).__name__
            if "Credential" in kind or "credentials" in str(err).lower():
                raise ConfigError(
                    f"{self.url(rel)}: no credentials for this store ({kind}); set them as for any client of it "
                    "(for S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
                ) from None
            if isinstance(err, (OSError, TimeoutError)) or "Connect" in kind or "Endpoint" in kind or "Timeout" in kind:
                raise ConfigError(f"{self.url(rel)}: unreachable ({kind}: {_first_line(err)})") from None
            raise MaecliError(f"{self.url(rel)}: {kind}: {_first_line(err)}") from None

    def read_text(self, rel: str) -> str | None:
        """A file's text, or None when there is none."""
        try:
            if not self.remote:
                return (self.staging / rel).read_text()
            with self._remote(rel):
                return self.fs.cat_file(self.url(rel)).decode()
        except FileNotFoundError:
            return None

    def read_texts(self, rels: list[str]) -> list[str]:
        if not self.remote:
            return [(self.staging / rel).read_text() for rel in rels]
        with self._remote(rels[0] if rels else ""):
            found = self.fs.cat([self.url(r) for r in rels], on_error="raise") if rels else {}  # fetched concurrently
        return [found[self.fs._strip_protocol(self.url(r))].decode() for r in rels]  # keyed without the protocol

    def sizes(self, folder: str) -> dict[str, int]:
        """The files of a folder (not hidden ones: temporary and lock files) and their sizes in bytes."""
        if not self.remote:
            try:
                return {e.name: e.stat().st_size for e in os.scandir(self.staging / folder) if e.is_file() and not e.name.startswith(".")}
            except FileNotFoundError:
                return {}
        with self._remote(folder):
            try:
                entries = self.fs.ls(self.url(folder), detail=True, refresh=True)
            except FileNotFoundError:
                return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e["size"]) for e in entries if e["type"] == "file"}

    def write_text(self, rel: str, text: str) -> None:
        if not self.remote:
            (self.staging / rel).parent.mkdir(parents=True, exist_ok=True)
            write_text(self.staging / rel, text)
            return
        with self._remote(rel):
            self.fs.pipe_file(self.url(rel), text.encode())

    def local(self, rels: list[str], sizes: list[int | None]) -> list[Path]:
        """Local paths of these files: the store's own for a folder; for a URL, cached copies, the missing ones
        downloaded together, each checked against its expected size."""
        if not self.remote:
            return [self.staging / rel for rel in rels]
        paths = [self.cache / rel for rel in rels]
        missing = [(rel, path) for rel, path in zip(rels, paths) if not path.exists()]
        if missing:
            paths[0].parent.mkdir(parents=True, exist_ok=True)
            tmps = [path.with_name(f".{path.name}.tmp{os.getpid()}") for _, path in missing]
            try:
                with self._remote(missing[0][0]):
                    self.fs.get([self.url(rel) for rel, _ in missing], [str(t) for t in tmps])
                for tmp, (_, path) in zip(tmps, missing):
                    os.replace(tmp, path)
            except FileNotFoundError as err:
                raise ConfigError(f"{err.filename or self.name}: missing from the store") from None
            finally:
                for tmp in tmps:
                    tmp.unlink(missing_ok=True)
            self._evict(keep=set(paths))
        now = time.time()
        for rel, path, size in zip(rels, paths, sizes):
            got = path.stat().st_size
            if size is not None and got != size:
                path.unlink(missing_ok=True)
                raise ConfigError(f"{self.url(rel)}: {got:,} bytes, its record says {size:,} (truncated or overwritten)")
            os.utime(path, (now, now))  # recently used: evicted last
        return paths

    def _evict(self, keep: set[Path]) -> None:
        """Delete the least recently used cached shards until the cache is within its bound (never those in use)."""
        files = sorted((p for p in (self.cache / "shards").glob("[!.]*") if p not in keep), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in (self.cache / "shards").glob("[!.]*"))
        while total > self.limit and files:
            victim = files.pop(0)
            total -= victim.stat().st_size
            victim.unlink(missing_ok=True)

    def publish(self, rels: list[str]) -> None:
        """Upload these staged files in order and delete the local copies (a no-op for a local store)."""
        if not self.remote:
            return
        for rel in rels:
            with self._remote(rel):
                self.fs.put_file(str(self.staging / rel), self.url(rel))
        for rel in rels:
            (self.staging / rel).unlink(missing_ok=True)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]

