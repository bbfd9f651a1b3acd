"""Where a run's files live: a local path, or an object-storage URL (`s3://bucket/prefix`)
reached through fsspec (s3fs), and the few operations the store, its lease and its logs need on
either. A local path stays a `Path`; a URL stays a string (pathlib would fold its `//`).

Credentials and the endpoint are never arguments: botocore's own chain reads them
(`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, `~/.aws/credentials`, an instance
role; `AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_S3` for an S3-compatible server), so nothing
secret is ever in a config value or a store's attrs.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import time
from pathlib import Path

# Listings are read afresh: another process (a resumed driver, `distlens verify`) may have
# written or deleted objects since this one last looked.
_OPTIONS = {"use_listings_cache": False}


def is_url(path) -> bool:
    return "://" in str(path)


def location(path) -> Path | str:
    """`path` as this module's functions take it: a `Path` (user home expanded), or a URL
    string without a trailing slash."""
    if isinstance(path, Path):
        return path
    return str(path).rstrip("/") if is_url(path) else Path(os.path.expanduser(str(path)))


def join(base, *names: str) -> Path | str:
    base = location(base)
    return "/".join([base, *names]) if isinstance(base, str) else base.joinpath(*names)


def parent(path) -> Path | str:
    path = location(path)
    return path.rsplit("/", 1)[0] if isinstance(path, str) else path.parent


def beside(path, suffix: str) -> Path | str:
    """`<path><suffix>`: a file kept next to `path` (its lease, its write log)."""
    path = location(path)
    return path + suffix if isinstance(path, str) else path.with_name(path.name + suffix)


def filesystem(path, **options):
    """(fsspec filesystem, path within it) of a local path or URL."""
    import fsspec

    path = location(path)
    if isinstance(path, Path):
        return fsspec.filesystem("file"), str(path)
    return fsspec.core.url_to_fs(path, **_OPTIONS, **options)


def zarr_store(path, read_only: bool = False):
    """What `zarr.open_group` takes for `path`: the local path as a string, or an FsspecStore."""
    path = location(path)
    if isinstance(path, Path):
        return str(path)
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(path, storage_options=dict(_OPTIONS), read_only=read_only)


def exists(path) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def is_file(path) -> bool:
    fs, p = filesystem(path)
    return fs.isfile(p)


def names(path) -> list[str]:
    """The names directly inside `path` (empty if there is nothing there)."""
    fs, p = filesystem(path)
    try:
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def glob(base, pattern: str) -> list[Path | str]:
    """Files and folders under `base` matching `pattern` (`*.zarr`, `*/summary.json`)."""
    base = location(base)
    if isinstance(base, Path):
        return list(base.glob(pattern))
    fs, p = filesystem(base)
    found = fs.glob(f"{p}/{pattern}")
    return [join(base, f[len(p) + 1 :]) for f in found if fnmatch.fnmatch(f[len(p) + 1 :], pattern)]


def read_text(path) -> str:
    fs, p = filesystem(path)
    return fs.cat_file(p).decode()


def write_bytes(path, data: bytes) -> None:
    fs, p = filesystem(path)
    if isinstance(location(path), Path):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    fs.pipe_file(p, data)


def create_exclusive(path, data: bytes) -> bool:
    """Create `path` holding `data` only if nothing is there: False if something is. Atomic
    locally (O_EXCL) and on S3 (a conditional put, `If-None-Match: *`)."""
    fs, p = filesystem(path)
    if isinstance(location(path), Path):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    try:
        with fs.open(p, "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    return True


def remove(path, ignore_errors: bool = False) -> None:
    """Remove a file or a folder (an object prefix) with everything in it, if it is there."""
    path = location(path)
    if isinstance(path, Path):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=ignore_errors)
        else:
            path.unlink(missing_ok=True)
        return
    fs, p = filesystem(path)
    files = fs.find(p)
    if files:
        fs.rm(files)


def move(src, dst) -> None:
    """Rename a file or folder. Locally one atomic rename; on object storage every object is
    copied, then the originals deleted (no rename there)."""
    src, dst = location(src), location(dst)
    if isinstance(src, Path):
        src.rename(dst)
        return
    fs, p = filesystem(src)
    _, q = filesystem(dst)
    files = fs.find(p)
    if files:
        fs.copy(files, [q + f[len(p) :] for f in files])
        fs.rm(files)


def upload(local_dir: Path, url: str, since: float = 0.0, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the files under `local_dir` changed at or after `since` (a time.time()) to the same
    names under `url`, except those whose name matches a pattern in `skip`; returns their URLs."""
    fs, base = filesystem(url)
    sent = []
    for f in sorted(local_dir.rglob("*")):
        if f.is_file() and f.stat().st_mtime >= since and not any(fnmatch.fnmatch(f.name, s) for s in skip):
            rel = f.relative_to(local_dir).as_posix()
            fs.put_file(str(f), f"{base}/{rel}")
            sent.append(f"{location(url)}/{rel}")
    return sent


class RecordLog:
    """An append-only log of JSON records beside a store. Locally a JSON Lines file appended to;
    on object storage, which cannot append, one object per record under `<name>/`, named so that
    their order is the order they were written in (time, process, sequence)."""

    def __init__(self, path):
        self.path = location(path)
        self._seq = 0

    def append(self, record: dict) -> None:
        line = json.dumps(record)
        if isinstance(self.path, Path):
            with open(self.path, "a") as f:
                f.write(line + "\n")
            return
        self._seq += 1
        write_bytes(f"{self.path}/{time.time_ns():020d}-{os.getpid():08d}-{self._seq:08d}.json", line.encode())

    def records(self) -> list[dict]:
        if isinstance(self.path, Path):
            return (
                [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()] if self.path.exists() else []
            )
        fs, p = filesystem(self.path)
        keys = sorted(fs.find(p))
        return [json.loads(v) for _, v in sorted(fs.cat(keys).items())] if keys else []

    def remove(self) -> None:
        remove(self.path)


class _QuietFileHandler(logging.FileHandler):
    """A log file that never prints logging's own traceback when its storage fails (a full
    disk): the store's writes report that failure, in one line."""

    def handleError(self, record) -> None:
        pass


class ObjectLogHandler(logging.Handler):
    """A log file on object storage: what it held when opened, then every record, the whole
    object rewritten at each record (one a batch; objects cannot be appended to). Quiet when the
    storage fails, as `_QuietFileHandler`."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self._text = read_text(url) if exists(url) else ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._text += self.format(record) + "\n"
            write_bytes(self.url, self._text.encode())
        except Exception:  # a log that cannot be written must not stop the run
            self.handleError(record)

    def handleError(self, record) -> None:
        pass


def log_handler(path) -> logging.Handler:
    """A handler appending to the log file `path`, local or on object storage."""
    path = location(path)
    return _QuietFileHandler(path) if isinstance(path, Path) else ObjectLogHandler(path)
