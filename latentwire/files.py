"""Files every command writes: atomic JSON, tolerant reads, an output folder proved writable
before the work starts, and names safe for a folder."""

import errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import StorageError, UsageError

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@contextmanager
def writing(path: Path, tmp: Path | None = None):
    """A failed write inside becomes StorageError naming `path`; the half-written `tmp` beside
    it is removed (on a full disk it holds the space the next try needs)."""
    try:
        yield
    except OSError as err:
        if tmp is not None:
            try:
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            except OSError:
                pass
        raise StorageError(path, err) from None


def write_json(path: Path, obj) -> None:
    """Write, flush to disk, then rename: a reader never sees a half-written file, and a
    failed write leaves the previous file as it was."""
    write_text(path, json.dumps(obj, indent=2))


def write_text(path: Path, text: str) -> None:
    """Beside the target, flushed to disk, then renamed into place (see write_json)."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    """As write_text, for bytes already serialised (a safetensors file)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with writing(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def read_json(path: Path):
    """The file's JSON, or None where it is missing or unreadable (a result to be redone)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def writable_dir(out: Path, flag: str) -> Path:
    """Prove now, not after an hour of work, that the folder can be made and takes a file,
    without making it: a command refused later (or a study cell left for later) leaves nothing
    behind. The first write into it makes it."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file")
        probe = existing / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write to output dir {out} ({err.strerror or err}); "
                         f"pass a writable {flag}")
    return out


def why_not_a_file(path: Path) -> str:
    """How a path that is no readable file fails, for a one-line refusal."""
    return "is not a regular file" if path.exists() else "does not exist"


def safe_name(text: str) -> str:
    """A name (a source, a model) as a folder name."""
    return _UNSAFE.sub("_", text)
