"""On-disk layout of Orbax checkpoints, and reading params out of them one tensor at a time.

Two kinds of folder hold params:
- a *params checkpoint* (written by `convert hf-to-orbax`): `params/` (an Orbax checkpoint
  whose one PyTree is the nested param dict, written a tensor at a time), the source
  `config.json`, `generation_config.json`, tokenizer files, `npo_jax_params.json` (what it
  is and in which dtype) and the source's `npo_jax_model.json` if it has one (the mask
  convention its model was trained with, `npo_jax.mask_convention`);
- a *training checkpoint* (an `orbax.checkpoint.CheckpointManager` root): numbered step folders,
  each with a `state` item whose `params` subtree holds the params, and the same config and
  tokenizer files beside the step folders, with the `npo_jax_model.json` of the run's mask.
Readers get the newest step of a training checkpoint and read only its params.

Both kinds carry `npo_jax_checksums.json` (size and sha256 of every Orbax file: in the params
checkpoint's root, and in each step folder, written once the step is complete); readers check it
first, so a truncated or altered file is an error naming it, not a failure deep inside
tensorstore or a silently wrong model. A killed save leaves an Orbax temporary folder
(`N.orbax-checkpoint-tmp...`), which readers ignore and the trainer deletes with a warning.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import v1 as ocp_v1

from npo_jax.config import LlamaConfig, read_config_dict
from npo_jax.errors import NpoJaxError
from npo_jax.fs import checksum_tree, verify_checksums, warn, write_checksums
from npo_jax.mask_convention import copy_record
from npo_jax.memory import trim_host_memory
from npo_jax.params import param_specs, stored_shape
from npo_jax.tree_paths import get_path, iter_paths, set_path

PARAMS_DIR = "params"
STATE_ITEM = "state"
MARKER = "npo_jax_params.json"
ORBAX_TMP = ".orbax-checkpoint-tmp"  # Orbax writes step N as N.orbax-checkpoint-tmp..., renamed when complete
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def copy_side_files(src: Path, dst: Path, names=SIDE_FILES) -> list[str]:
    """Copy config, generation config and tokenizer files that exist in `src`; return their names."""
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def save_params_checkpoint(dst: Path, arrays: Iterable[tuple[tuple[str, ...], object]], source: Path,
                           dtype: str) -> None:
    """Write a params checkpoint into the (new, empty) folder `dst` from (path, array) pairs.

    Each array goes to disk in its own Orbax partial save, so the caller can free it before
    making the next: one save of the whole tree makes a full host copy of it first (measured:
    peak RSS params + 1.0x), too much for a 3B model in float32 on a 24 GiB host.
    """
    target = (dst / PARAMS_DIR).absolute()
    for path, array in arrays:
        tree: dict = {}
        set_path(tree, path, array)
        ocp_v1.partial.save(target, tree)
        del tree, array
        trim_host_memory()
    ocp_v1.partial.finalize(target)
    write_checksums(dst, checksum_tree(dst, PARAMS_DIR))
    copy_side_files(source, dst)
    copy_record(source, dst)  # an HF release has none, and its checkpoint then has none either
    (dst / MARKER).write_text(json.dumps({"format": "npo-jax-params", "version": 1, "dtype": dtype,
                                          "source": str(source)}, indent=2) + "\n")


def _pytree_dir(folder: Path) -> Path | None:
    """The folder holding the Orbax PyTree (`_METADATA`): `folder` itself or a checkpointable in it."""
    if (folder / "_METADATA").is_file():
        return folder
    if folder.is_dir():
        for sub in sorted(folder.iterdir()):
            if (sub / "_METADATA").is_file():
                return sub
    return None


def _step_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def remove_unfinished_saves(root: Path) -> list[Path]:
    """Delete the temporary folders of saves that never completed (the process was killed)."""
    left = [p for p in root.iterdir() if ORBAX_TMP in p.name] if root.is_dir() else []
    for p in left:
        warn(f"{p}: removing an unfinished checkpoint save (the run was killed while writing it)")
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()
    return left


def verify_step(step_dir: Path) -> None:
    """Check a training checkpoint step against its checksum manifest; the error says what to do."""
    try:
        if not verify_checksums(step_dir):
            warn(f"{step_dir}: no checksum manifest (the run stopped just after the save, or "
                 f"checkpoint.checksums=false); using it unchecked")
    except NpoJaxError as e:
        earlier = [int(p.name) for p in _step_dirs(step_dir.parent) if int(p.name) < int(step_dir.name)]
        hint = (f"delete {step_dir} to resume from step {earlier[-1]}" if earlier
                else "no earlier checkpoint is left; start again with --overwrite")
        raise NpoJaxError(f"{e}; checkpoint step {step_dir.name} is damaged: {hint}") from None


def check_saved_params(step_dir: Path, params) -> None:
    """The params saved in training step `step_dir` have the shapes of `params`, read from its
    metadata: a restore of another model size fails half-way, and Orbax's unfinished background
    reads then print tracebacks after the error."""
    try:
        saved = ocp.PyTreeCheckpointer().metadata((step_dir / STATE_ITEM).absolute()).item_metadata.tree
        saved = dict(iter_paths(saved["params"]))
    except Exception:  # unreadable metadata: the restore itself says what is wrong
        return
    for path, leaf in iter_paths(params):
        got = tuple(saved[path].shape) if path in saved else None
        if got != tuple(leaf.shape):
            was = f"saved with shape {list(got)}" if got else "not saved"
            raise NpoJaxError(f"{step_dir}: cannot restore the checkpoint: parameter '{'/'.join(path)}' was {was}, "
                              f"this run's model has {list(leaf.shape)} (a checkpoint of another model?)")


class ParamsReader:
    """Params of a params or training checkpoint, validated against the config, read per tensor."""

    def __init__(self, folder: str | Path, verify: bool = True):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise NpoJaxError(f"{self.folder}: no such checkpoint folder")
        if (self.folder / MARKER).is_file() and (item := _pytree_dir(self.folder / PARAMS_DIR)):
            self.item_dir, self.prefix = item, ()
            if verify:
                verify_checksums(self.folder)
        elif steps := [s for s in _step_dirs(self.folder) if (s / STATE_ITEM).is_dir()]:
            self.item_dir, self.prefix = steps[-1] / STATE_ITEM, ("params",)
            if verify:
                verify_step(steps[-1])
        else:
            raise NpoJaxError(
                f"{self.folder}: not an npo-jax Orbax checkpoint (expected {PARAMS_DIR}/ and {MARKER} from "
                f"`convert hf-to-orbax`, or numbered step folders with a '{STATE_ITEM}' item from training)"
            )
        self.raw_config = read_config_dict(self.folder / "config.json")
        self.config = LlamaConfig.from_hf_dict(self.raw_config, source=str(self.folder / "config.json"))
        try:
            tree = ocp.PyTreeCheckpointer().metadata(self.item_dir.absolute()).item_metadata.tree
        except Exception as e:  # orbax raises many types for a damaged folder
            raise NpoJaxError(f"{self.item_dir}: cannot read Orbax checkpoint metadata ({e})") from None
        for key in self.prefix:
            if not isinstance(tree, dict) or key not in tree:
                raise NpoJaxError(f"{self.item_dir}: checkpoint has no '{key}' subtree")
            tree = tree[key]
        self.metadata = {path: leaf for path, leaf in iter_paths(tree)}
        self._validate()

    def _validate(self) -> None:
        expected = {spec.path: stored_shape(spec, self.config) for spec in param_specs(self.config)}
        for path, shape in expected.items():
            if path not in self.metadata:
                raise NpoJaxError(f"{self.item_dir}: missing parameter '{'/'.join(path)}'")
            got = tuple(self.metadata[path].shape)
            if got != shape:
                raise NpoJaxError(f"{self.item_dir}: parameter '{'/'.join(path)}' has shape {list(got)}, "
                                  f"expected {list(shape)} from config.json")
        for path in self.metadata:
            if path not in expected:
                raise NpoJaxError(f"{self.item_dir}: unexpected parameter '{'/'.join(path)}' for this config")

    def dtype(self, path: tuple[str, ...]) -> np.dtype:
        return np.dtype(self.metadata[path].dtype)

    def read(self, path: tuple[str, ...]) -> np.ndarray:
        """One parameter as a host numpy array (Orbax partial restore: nothing else is read)."""
        return self._restore({path: None})[path]

    def read_all(self, shardings: dict | None = None) -> dict:
        """All params as a nested dict: numpy arrays, or jax arrays placed on `shardings`."""
        flat = self._restore({path: None for path in self.metadata}, shardings)
        out: dict = {}
        for path, value in flat.items():
            set_path(out, path, value)
        return out

    def _restore(self, paths: dict, shardings: dict | None = None) -> dict:
        item, args = {}, {}
        for path in paths:
            meta = self.metadata[path]
            full = (*self.prefix, *path)
            sharding = None if shardings is None else get_path(shardings, path)
            abstract = jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding)
            arg = (ocp.ArrayRestoreArgs(sharding=sharding) if sharding is not None
                   else ocp.RestoreArgs(restore_type=np.ndarray))
            set_path(item, full, abstract)
            set_path(args, full, arg)
        checkpointer = ocp.PyTreeCheckpointer()
        if shardings is None:  # numpy reads are this process's alone: no barrier (export runs on one host)
            local = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                       active_processes={jax.process_index()})
            checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=local),
                                            multiprocessing_options=local)
        try:
            restored = checkpointer.restore(
                self.item_dir.absolute(),
                args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True),
            )
        except Exception as e:
            raise NpoJaxError(f"{self.item_dir}: cannot restore parameters ({e})") from None
        return {path: get_path(restored, (*self.prefix, *path)) for path in paths}

