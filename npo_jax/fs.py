"""Writing an output folder all-or-nothing: into a temporary sibling, renamed into place."""

from __future__ import annotations

import contextlib
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
