"""Writing an output folder all-or-nothing (into a temporary sibling, renamed into place), and
checksum manifests that let a reader tell a damaged file from a good one.

A writer killed inside `atomic_output_dir` (SIGKILL, power loss) leaves a `.NAME.tmp-*` folder,
or, if it died between the two renames of a replace, a `.NAME.old-*` folder and no NAME; the
next `check_output_dir` on NAME cleans that up with a warning. One writer per destination.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Collection
from pathlib import Path

from npo_jax.errors import NpoJaxError

CHECKSUMS_NAME = "npo_jax_checksums.json"
_CHECKSUMS_FORMAT = "npo-jax-checksums"


def cache_dir(configured: str | Path | None) -> Path:
    """The run config's `cache_dir`, or ~/.cache/npo_jax when it sets none (reference log-probs,
    prepared TOFU files)."""
    return Path(configured) if configured else Path.home() / ".cache" / "npo_jax"


def warn(message: str) -> None:
    print(f"npo-jax: warning: {message}", file=sys.stderr, flush=True)


def recover_interrupted(dst: str | Path) -> None:
    """Undo what a killed `atomic_output_dir` left beside `dst`: put back the previous version if
    a replace died between its renames, and delete half-written temporary folders."""
    dst = Path(dst).absolute()
    if not dst.parent.is_dir():
        return
    left = [p for p in dst.parent.iterdir() if p.is_dir() and p.name.startswith(f".{dst.name}.")]
    olds = sorted((p for p in left if p.name.startswith(f".{dst.name}.old-")), key=lambda p: p.stat().st_mtime)
    if olds and not dst.exists():
        os.rename(olds[-1], dst)
        warn(f"{dst}: a replace was interrupted; restored the previous version from {olds.pop().name}")
    for p in olds + [p for p in left if p.name.startswith(f".{dst.name}.tmp-")]:
        warn(f"{p}: removing a half-written folder left by an interrupted write")
        shutil.rmtree(p, ignore_errors=True)


def check_output_path(dst: str | Path) -> Path:
    """`dst` can become a folder: it is not a file and no folder above it is one (a plain error
    here, instead of NotADirectoryError or FileExistsError half-way through a write)."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise NpoJaxError(f"{dst}: is a file, not an output folder")
    for parent in dst.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise NpoJaxError(f"{dst}: cannot create this output folder: {parent} is a file")
            break
    return dst


def check_output_dir(dst: str | Path, overwrite: bool, replaces: Collection[str] | None = None) -> Path:
    """`dst` may be written: new, empty, or (with `overwrite`) replaceable.

    `replaces`: the names a previous output of the same command consists of. Given, `overwrite`
    replaces only a folder holding nothing else, so a mistyped `--out` (a run folder with its
    checkpoints, a user's files) is never deleted.
    """
    dst = check_output_path(dst)
    recover_interrupted(dst)
    if not (dst.exists() and any(dst.iterdir())):
        return dst
    if not overwrite:
        raise NpoJaxError(f"{dst}: output folder exists (pass --overwrite to replace it)")
    foreign = sorted(p.name for p in dst.iterdir() if p.name not in replaces) if replaces is not None else []
    if foreign:
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise NpoJaxError(f"{dst}: not replaced, even with --overwrite: it holds {shown}, which this command does "
                          f"not write (--overwrite replaces only a previous output: {', '.join(sorted(replaces))})")
    return dst


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, overwrite: bool = False, replaces: Collection[str] | None = None):
    """Yield a fresh temporary folder beside `dst`; on success it becomes `dst`, on error it goes.
    `overwrite`, `replaces`: as `check_output_dir`."""
    dst = check_output_dir(dst, overwrite, replaces).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except OSError as e:  # a full disk, a quota: say so plainly, and that nothing was replaced
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous {dst.name} is unchanged" if dst.exists() else "nothing was written"
        raise NpoJaxError(f"{dst}: writing failed ({e}); {kept}") from e
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


# -- checksums ------------------------------------------------------------------------------------


def file_checksum(path: str | Path) -> dict:
    """{"size", "sha256"} of a file, read in 4 MiB pieces (about 1 GB/s)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return {"size": Path(path).stat().st_size, "sha256": h.hexdigest()}


def checksum_tree(root: str | Path, under: str | None = None) -> dict[str, dict]:
    """Checksums of every file below `root/under` (default: all of `root` but the manifest), keyed
    by their path relative to `root`."""
    root = Path(root)
    files = sorted(p for p in (root / under if under else root).rglob("*") if p.is_file())
    return {str(p.relative_to(root)): file_checksum(p) for p in files if p.name != CHECKSUMS_NAME}


def write_checksums(folder: str | Path, entries: dict[str, dict]) -> Path:
    """Record `entries` (relative path -> {"size", "sha256"}) as `folder/npo_jax_checksums.json`."""
    manifest = {"format": _CHECKSUMS_FORMAT, "version": 1, "algorithm": "sha256", "files": entries}
    return atomic_write_text(Path(folder) / CHECKSUMS_NAME, json.dumps(manifest, indent=1) + "\n")


def verify_checksums(folder: str | Path) -> bool:
    """Check the files listed in `folder/npo_jax_checksums.json` against it: an NpoJaxError names the
    first missing, truncated or altered file. False when there is no manifest (nothing checked).

    Sizes are compared first (a truncated file fails fast), then contents.
    """
    manifest = Path(folder) / CHECKSUMS_NAME
    if not manifest.exists():
        return False
    data = read_json_object(manifest, "checksum manifest")
    entries = data.get("files")
    well_formed = isinstance(entries, dict) and all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
        for e in entries.values())
    if data.get("format") != _CHECKSUMS_FORMAT or data.get("algorithm") != "sha256" or not well_formed:
        raise NpoJaxError(f"{manifest}: not an npo-jax sha256 checksum manifest")
    for rel, entry in entries.items():
        path = Path(folder) / rel
        if not path.is_file():
            raise NpoJaxError(f"{path}: missing (listed in {manifest})")
        if path.stat().st_size != entry["size"]:
            raise NpoJaxError(f"{path}: {path.stat().st_size} bytes, expected {entry['size']} as recorded in "
                              f"{manifest} (truncated or overwritten)")
    for rel, entry in entries.items():
        path = Path(folder) / rel
        if file_checksum(path)["sha256"] != entry["sha256"]:
            raise NpoJaxError(f"{path}: contents do not match the sha256 recorded in {manifest} "
                              f"(the file is damaged or was altered)")
    return True
