"""Atomic, durable writes: a crash or an error never leaves a half-written output behind.

A file or folder is written under a hidden name beside its target, flushed to disk, then renamed
into place, so a reader sees the old version or the complete new one. New files and folders get
the user's umask permissions (``tempfile.mkstemp`` would make them 0600, unreadable to the lab
sharing a results folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import shutil
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kscu import interrupts
from kscu.errors import KscuError


def _hidden_sibling(path: Path, kind: str, create: Callable[[Path], None]) -> Path:
    """A fresh hidden name beside ``path``, created exclusively by ``create``."""
    while True:
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.{kind}")
        try:
            create(candidate)
            return candidate
        except FileExistsError:
            continue


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies


def _new_folder(path: Path) -> None:
    os.mkdir(path, 0o777)  # the umask applies


def _unused(path: Path) -> None:
    if os.path.lexists(path):
        raise FileExistsError(path)


def check_writable(path: str | Path, folder: bool = True, flag: str = "--output") -> None:
    """Fail before any work if ``path`` (a folder, or a file if not ``folder``) cannot be
    written: a long run must not end in an OSError, or leave half its output behind.

    The nearest existing folder on the way to ``path`` must take a new file (one is made and
    removed again): the test a permission bit alone cannot give (root ignores them; ``/proc``).
    """
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        want = "a folder" if folder else "a file name"
        raise KscuError(f"{flag} {path} is a {'file' if folder else 'folder'}; give {want}")
    existing = path if path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise KscuError(f"{flag} {path} goes through the file {existing}; give another path")
    try:
        _hidden_sibling(existing / "kscu", "probe", _new_file).unlink()
    except OSError as e:
        raise KscuError(
            f"{flag} {path}: cannot write in {existing} ({e.strerror}); give a writable path"
        ) from None


def check_replaceable(
    path: str | Path,
    name: str,
    what: str,
    ours: Callable[[Path], bool],
    overwrite: bool,
    *,
    fix: str = "give another path",
    unrecognised: str = "",
) -> None:
    """Refuse, before any work, to replace an existing file unless ``overwrite``, and even then
    unless ``ours`` says it is an earlier ``what`` that this command wrote: a typo in a path, or
    a file of the same name, must never cost an erase's record, a generate.json or anyone's notes.

    ``name`` says which path it is (``--output FILE``); ``fix`` is the advice both refusals give;
    ``unrecognised`` follows "is not a kscu {what}" where a file kscu wrote may still not be
    recognised (one written before kscu marked such files).
    """
    path = Path(path)
    if not os.path.lexists(path):
        return
    if not ours(path):
        raise KscuError(
            f"{name} already exists and is not a kscu {what}{unrecognised}; {fix} (kscu does "
            "not replace a file it did not write, even with --overwrite)"
        )
    if not overwrite:
        raise KscuError(f"{name} already holds a {what}; {fix}, or pass --overwrite to replace it")


def file_sha256(path: str | Path) -> str:
    """A file's sha256, read a MiB at a time: checkpoints are gigabytes, and what identifies a
    run's weights (generate.json, attack.json, report) or an image (evaluate's cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (so a rename in it survives a power cut)."""
    if os.name == "nt" and Path(path).is_dir():
        return  # Windows cannot open a folder to flush it
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden_sibling(path, "tmp", _new_file)
    wanted = stat.S_IMODE(tmp.stat().st_mode)  # what the umask gives a new file
    try:
        yield tmp
        if stat.S_IMODE(tmp.stat().st_mode) != wanted:
            os.chmod(tmp, wanted)  # the writer made its own file (safetensors makes it 0600)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a new hidden folder beside ``path``; it becomes ``path`` only if the block succeeds.

    ``path`` may be missing or an empty folder. With ``replace`` it may also hold an earlier
    version: that one is moved aside, the new one moved in, and only then the old one deleted,
    so a crash at any point leaves one complete version (at worst under its hidden name).
    Whether a folder may be replaced is the caller's decision, taken before the work starts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden_sibling(path, "tmp", _new_folder)
    try:
        yield tmp
        fsync_path(tmp)
        _swap_in(tmp, path, replace)
    finally:
        _remove(tmp)


def _swap_in(new: Path, path: Path, replace: bool) -> None:
    """Move ``new`` to ``path``, the version there (if any) aside and then away. Signals also
    wait for that removal (the old run's files, images included), so an interrupted swap leaves
    no half-deleted hidden copy behind."""
    old = None
    with interrupts.deferred(signal.SIGINT, signal.SIGTERM):
        if path.exists() or path.is_symlink():
            if not replace and not (path.is_dir() and not any(path.iterdir())):
                raise KscuError(
                    f"{path} was filled by something else meanwhile; nothing was replaced"
                )
            old = _hidden_sibling(path, "old", _unused)
            os.rename(path, old)
        try:
            os.rename(new, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)
            raise
        fsync_path(path.parent)
        if old is not None:
            _remove(old)


def write_text(path: str | Path, text: str) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def is_number(value: Any) -> bool:
    """A finite int or float as JSON gives it back (not a bool, None, a string or NaN): what a
    number kscu wrote into a JSON file must still be when it is read again."""
    return type(value) in (int, float) and math.isfinite(value)


def read_json_object(path: str | Path, fix: str) -> dict[str, Any]:
    """A JSON object kscu wrote earlier; a damaged one is a one-line error ending in ``fix``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KscuError(f"cannot read {path} ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise KscuError(f"{path} does not hold a JSON object; {fix}")
    return data
