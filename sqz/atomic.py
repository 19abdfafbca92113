"""Crash-safe output: write a temporary file beside the destination, fsync, then rename over it.

A reader of the destination path sees either nothing, the previous file, or the complete new one;
never a partial file, even if the process is killed midway.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import OutputError, OutputExistsError


def check_writable(dest: Path, force: bool) -> None:
    """Refuse early (before any work) to overwrite an existing output without --force."""
    if dest.exists() and not force:
        raise OutputExistsError(f"{dest} exists; use --force to overwrite it")
    if dest.is_dir():
        raise OutputExistsError(f"{dest} is a directory")
    if not dest.parent.is_dir():
        raise OutputError(f"{dest.parent}: output directory does not exist")


@contextlib.contextmanager
def atomic_path(dest: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path in dest's directory; on success it replaces dest, on failure it is removed. An
    OSError while the output is made (a read-only directory, a full disk) is an OutputError."""
    dest = Path(dest)
    check_writable(dest, force)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    except OSError as exc:
        raise _cannot_write(dest, exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, dest.stat().st_mode & 0o7777 if dest.exists() else _default_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        check_writable(dest, force)  # something may have appeared meanwhile
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except OSError as exc:
        raise _cannot_write(dest, exc) from None
    finally:
        tmp.unlink(missing_ok=True)


def make_folder(path: Path) -> None:
    """An output folder and its parents (they may exist); an OSError (a file in the way, a read-only parent) is
    an OutputError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create the output folder: {exc.strerror or exc}") from None


@contextlib.contextmanager
def output_folder(path: Path) -> Iterator[None]:
    """make_folder for the body's outputs; if the body fails, the folders it made are removed again (only empty
    ones: the body's atomic outputs leave nothing in them), so a failed decode leaves no empty folder behind."""
    made = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    make_folder(path)
    try:
        yield
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _cannot_write(dest: Path, exc: OSError) -> OutputError:
    return OutputError(f"{dest}: cannot write: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_file(dest: str | Path, force: bool = False) -> Iterator[BinaryIO]:
    """atomic_path, opened for binary writing."""
    with atomic_path(dest, force) as tmp, open(tmp, "wb") as f:
        yield f


def _default_mode() -> int:
    """What open() would have given a new file: 0o666 less the umask (mkstemp makes files 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
