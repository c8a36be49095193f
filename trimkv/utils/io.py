"""File helpers: atomic writes and JSONL reading with errors that name the file and line."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


class DataFileError(ValueError):
    """A data file is missing or holds a record that cannot be parsed."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename.

    A reader never sees a partial file: either the old content or the whole new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_write_folder(target: str | os.PathLike, write_contents: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling folder with `write_contents(folder)`, then rename it to `target`.

    An existing `target` is removed just before the rename, so a crash in between leaves no
    `target` but never a partial one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write_contents(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_json_list(path: str | os.PathLike, what: str, missing_hint: str, name: str = "data file") -> list:
    """Read a JSON file that contains a list; errors name the file (and line for malformed JSON).

    `what` describes the list items for the type error, `missing_hint` tells how to fix a missing
    file, and `name` says what the file is in that message.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{name} not found: {path} ({missing_hint})")
    try:
        with path.open("r", encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise DataFileError(f"{path}:{error.lineno}:{error.colno}: malformed JSON ({error.msg})") from None
    if not isinstance(data, list):
        raise DataFileError(f"{path}: expected a JSON list of {what}, got {type(data).__name__}")
    return data


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file into a list of dicts.

    Raises DataFileError naming the file (and the line for a malformed record), so a
    user can fix the data without a stack trace.
    """
    return list(iter_jsonl(path))


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"data file not found: {path} (check the path, e.g. task.data_path=...)")
    with path.open("r", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFileError(
                    f"{path}:{line_number}: malformed JSON line ({error.msg}); fix or remove that line"
                ) from None
            if not isinstance(record, dict):
                raise DataFileError(
                    f"{path}:{line_number}: expected a JSON object per line, got {type(record).__name__}"
                )
            yield record


def append_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Append records to a JSONL file, one flushed line each."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
