"""Writing an output folder all-or-nothing: into a temporary sibling, renamed into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

from npo_jax.errors import NpoJaxError


def check_output_dir(dst: str | Path, overwrite: bool) -> Path:
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise NpoJaxError(f"{dst}: output folder exists (pass --overwrite to replace it)")
    return dst


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, overwrite: bool = False):
    """Yield a fresh temporary folder beside `dst`; on success it becomes `dst`, on error it goes."""
    dst = check_output_dir(dst, overwrite).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)


def read_json_object(path: str | Path, what: str = "file", error: type[NpoJaxError] = NpoJaxError) -> dict:
    """A JSON file that must hold an object; a missing or malformed file is an `error` naming it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object")
    return value


def atomic_write(path: str | Path, write) -> Path:
    """Call `write(tmp_path)` on a temporary sibling of `path` (same suffix), then rename it into place."""
    path = Path(path)
    tmp = path.parent / f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))
