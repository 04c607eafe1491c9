"""Run folders on disk: checked before compute, written atomically, stale temporaries cleaned."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile

import pandas as pd

from paramarket_jax.errors import ParamarketError

# Temporary run folders are named ``.<name>.<pid>.<8 random characters>`` (tempfile's
# alphabet has no dots), so stale ones of a killed run can be told apart from anyone else's.
_TEMP_TAIL = re.compile(r"(\d+)\.[a-z0-9_]{8}")


def _temp_prefix(path: pathlib.Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _name_max(folder: pathlib.Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_writable(path: pathlib.Path, what: str = "--out") -> None:
    """Raise ParamarketError unless a folder can be created at ``path`` (and a temporary
    sibling beside it): every missing part of it fits a file name, and the nearest existing
    folder above it takes a new folder (probed by creating and removing one)."""
    try:
        absolute = pathlib.Path(path).resolve()
        existing = next(p for p in absolute.parents if p.exists())
    except (OSError, ValueError, RuntimeError) as err:
        raise ParamarketError(f"{what} {path}: not a usable path ({_strerror(err)})") from None
    if not existing.is_dir():
        raise ParamarketError(f"{what} {path}: {existing} is a file, not a folder")
    limit = _name_max(existing)
    missing = [p for p in [absolute, *absolute.parents] if existing in p.parents]
    names = [p.name for p in missing] + [_temp_prefix(absolute) + "x" * 8]
    too_long = [n for n in names if len(os.fsencode(n)) > limit]
    if too_long:
        raise ParamarketError(
            f"{what} {path}: the name {too_long[0][:40]!r}... is longer than this file system "
            f"allows ({limit} bytes)"
        )
    try:
        probe = tempfile.mkdtemp(prefix=_temp_prefix(absolute), dir=existing)
        os.rmdir(probe)
    except OSError as err:
        raise ParamarketError(
            f"{what} {path}: cannot create a folder in {existing} ({_strerror(err)}); "
            f"choose a writable location"
        ) from None


def _strerror(err: BaseException) -> str:
    return getattr(err, "strerror", None) or str(err)


def check_out_dir(out: str | os.PathLike, *, resume: bool = False) -> pathlib.Path:
    """The run folder must not exist yet, or be an empty folder, so nothing earlier is
    overwritten; it must be creatable (checked before any compute). Returns it as a Path.

    Args:
        out: the folder.
        resume: a sweep folder, which may already hold cells: it must be a folder (or
            creatable) in which new folders can be made.
    """
    path = pathlib.Path(out)
    if not str(out):
        raise ParamarketError("--out must name a folder, got an empty path")
    try:
        exists, is_dir = path.exists(), path.is_dir()
        not_empty = is_dir and any(path.iterdir())
    except (OSError, ValueError) as err:
        raise ParamarketError(f"--out {path}: not a usable path ({_strerror(err)})") from None
    if exists and not is_dir:
        raise ParamarketError(
            f"--out {path} already exists and is not a folder; choose a new folder"
        )
    if not_empty and not resume:
        raise ParamarketError(f"--out {path} already exists and is not empty; choose a new folder")
    check_writable(path / "cell" if resume and is_dir else path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's live process (or not a pid we can ask about): keep
    return True


def clean_stale_temps(path: pathlib.Path) -> list[pathlib.Path]:
    """Remove temporary siblings ``.<name>.<pid>.*`` of ``path`` left by killed runs (their
    pid no longer exists); returns what was removed. Nobody else's folders are touched."""
    parent, head = path.parent, f".{path.name}."
    removed = []
    try:
        entries = [e for e in parent.iterdir() if e.name.startswith(head)]
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_TAIL.fullmatch(entry.name[len(head) :])
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_run(out: str | os.PathLike, files: dict[str, object]) -> pathlib.Path:
    """Write a run folder atomically: everything goes to a temporary sibling
    (``.<name>.<pid>.XXXXXXXX``), then renames; stale temporaries of killed runs are
    removed first. The folder gets the usual permissions (``0o777`` less the umask).

    Args:
        out: the run folder (must not exist or be empty).
        files: file name -> a DataFrame (Parquet), dict (JSON), str (text), or a callable
            taking the destination path (plots).
    """
    given = check_out_dir(out)
    path = given.resolve()  # a symbolic link to an empty folder (or to none) is followed
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        _write_files(tmp, files)
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return given


def _write_files(folder: pathlib.Path, files: dict[str, object]) -> None:
    for name, content in files.items():
        dest = folder / name
        if isinstance(content, pd.DataFrame):
            content.to_parquet(dest, index=False)
        elif isinstance(content, dict):
            dest.write_text(json.dumps(content, indent=2) + "\n")
        elif isinstance(content, str):
            dest.write_text(content)
        elif isinstance(content, bytes):
            dest.write_bytes(content)
        else:
            content(dest)


def write_into(out: str | os.PathLike, files: dict[str, object], last: str = "summary.json"):
    """Write a run's files into its existing folder (a checkpointed run's, see
    :mod:`paramarket_jax.engines.checkpoint`): they are written to a temporary sibling first and
    renamed in one by one, ``last`` last, so a folder holding ``last`` holds every file
    whole. Stale temporaries of killed runs are removed first.
    """
    path = pathlib.Path(out).resolve()
    clean_stale_temps(path)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    try:
        _write_files(tmp, files)
        for name in sorted(files, key=lambda name: name == last):
            os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
