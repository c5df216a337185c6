"""A training run's checkpoints: async Orbax saves with checksum manifests, and checked restores.

`TrainCheckpoints` wraps an `ocp.CheckpointManager` over `OUTPUT/checkpoints` (step folders
with the train state and a `meta` record). A save runs in the background; the next save, a
stop or the end of the run waits for it, and then the primary host writes the step's checksum
manifest (`npo_jax.fs`). A restore first verifies the step's checksums (one host reads, all
learn the verdict) and then checks that the run it came from makes the same steps from the
same data. Errors name the folder, the step and the last complete checkpoint; a failed save
keeps the OS reason from tensorstore's error (docs/reliability.md). It knows nothing of
devices: the trainer hands it the host view of the state and the abstract restore target.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import orbax.checkpoint as ocp

from npo_jax import distributed
from npo_jax.checkpoint import STATE_ITEM, check_saved_params, verify_step
from npo_jax.errors import NpoJaxError
from npo_jax.fs import checksum_tree, write_checksums

_TENSORSTORE_SPEC = re.compile(r"\s*\[tensorstore_spec='[^']*'\]")


# what a checkpoint without a "data_order" record was saved with (the defaults before it existed)
DEFAULT_DATA_ORDER = {"epoch_mode": "drop", "retain_pairing": "fixed"}


def _order_text(order: dict) -> str:
    return (f"optim.epoch_mode={order.get('epoch_mode')}, "
            f"data.retain_pairing={order.get('retain_pairing')}")


def _first_line(e: BaseException, head: int = 150, tail: int = 350) -> str:
    """The error's first line without tensorstore's spec dump, its middle elided if long.

    Tensorstore ends its errors with the OS reason ("File too large [os_error_code='27']") and then
    the whole spec of the array (often over 1000 characters); the reason is what a user needs."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = _TENSORSTORE_SPEC.sub("", text)
    return text if len(text) <= head + tail else f"{text[:head]} ... {text[-tail:]}"


def _out_of_space(e: BaseException) -> bool:
    codes = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return getattr(e, "errno", None) in codes or any(
        os_text in str(e) for os_text in ("No space left", "File too large", "Disk quota exceeded"))


def _check_base(step_dir: Path, saved: dict | None, current: dict | None) -> None:
    """LoRA adapters resume only on the base model they were trained on (`npo_jax.lora.base_checksum`)."""
    if (saved is None) != (current is None):
        what = "LoRA adapters" if saved else "a full model"
        raise NpoJaxError(f"{step_dir}: the checkpoint holds {what}, this run trains "
                          f"{'a full model (lora.rank=0)' if saved else 'LoRA adapters'}")
    if saved is not None and saved["sha256"] != current["sha256"]:
        raise NpoJaxError(f"{step_dir}: the adapters were trained on the base model {saved['path']} (sha256 "
                          f"{saved['sha256'][:16]}...); model.path {current['path']} has sha256 "
                          f"{current['sha256'][:16]}... (another base model)")


class TrainCheckpoints:
    """Saves and restores of one run's train state; `last_saved` is the newest step saved (maybe
    still writing), `last_complete` the newest written and checksummed (None: none yet)."""

    def __init__(self, folder: Path, keep: int, checksums: bool):
        self.dir = folder
        self.checksums = checksums
        self.manager = ocp.CheckpointManager(folder, item_names=(STATE_ITEM, "meta"),
                                             options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
        self.last_saved: int | None = None
        self.last_complete: int | None = None
        self._in_flight: list[int] = []

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, host_state: dict, meta: dict) -> None:
        """Start an async save of `step` (after the previous one is complete and checksummed)."""
        self.finish_saves()
        try:
            self.manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(host_state),
                                                               "meta": ocp.args.JsonSave(meta)}), force=True)
        except Exception as e:
            raise NpoJaxError(self._save_failed(step, e)) from e
        self.last_saved = step
        self._in_flight.append(step)

    def finish_saves(self) -> None:
        """Wait for the saves in flight; then the primary records each new step's checksums.

        The manifest goes into the step folder once Orbax has renamed it into place, so a step
        without one is complete but unchecked (the run died in between), never half-written.
        """
        if not self._in_flight:
            return
        step = self._in_flight[-1]
        try:
            self.manager.wait_until_finished()
            if distributed.is_primary() and self.checksums:
                for s in self._in_flight:
                    write_checksums(self.dir / str(s), checksum_tree(self.dir / str(s)))
        except Exception as e:
            raise NpoJaxError(self._save_failed(step, e)) from e
        self.last_complete = step
        self._in_flight.clear()

    def _save_failed(self, step: int, e: BaseException) -> str:
        hint = " (out of disk space?)" if _out_of_space(e) else ""
        kept = (f"the last complete checkpoint, step {self.last_complete}, is intact" if self.last_complete
                else "no earlier checkpoint was written")
        return f"{self.dir}: saving the checkpoint of step {step} failed{hint}: {_first_line(e)}; {kept}"

    def restore(self, step: int, abstract_state: dict, *, total_steps: int, seed: int,
                data_order: dict | None = None, base_model: dict | None = None) -> tuple[dict, int]:
        """The state saved at `step` (laid out as `abstract_state`) and its data position, once its
        checksums verify and it comes from a run of `total_steps` steps with `seed` (and, if
        given, the same `data_order`; a checkpoint without one was saved with the defaults)."""
        step_dir = self.dir / str(step)
        failed = None
        if distributed.is_primary():  # one host reads the files; all learn the verdict
            try:
                verify_step(step_dir)
            except NpoJaxError as e:
                failed = e
        if distributed.any_process(failed is not None):
            raise failed or NpoJaxError(f"{step_dir}: failed its checksum check on process 0 (see its log)")
        check_saved_params(step_dir, abstract_state["params"])  # before Orbax starts reads it cannot finish
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                **{STATE_ITEM: ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}))
        except Exception as e:
            raise NpoJaxError(f"{step_dir}: cannot restore the checkpoint ({_first_line(e)}); was it saved by a run "
                              f"with another model or optimizer config (e.g. optim.skip_nonfinite)?") from None
        meta = restored["meta"]
        if (meta["total_steps"], meta["seed"]) != (total_steps, seed):
            raise NpoJaxError(f"{step_dir}: saved by a run of {meta['total_steps']} steps with seed {meta['seed']}; "
                              f"this config makes {total_steps} steps with seed {seed} (the "
                              f"data order would differ: keep optim.effective_batch, optim.epochs, seed and the data)")
        saved_order = meta.get("data_order", DEFAULT_DATA_ORDER)
        if data_order is not None and saved_order != data_order:
            raise NpoJaxError(f"{step_dir}: saved by a run with {_order_text(saved_order)}; this config has "
                              f"{_order_text(data_order)} (the data order would differ)")
        _check_base(step_dir, meta.get("base_model"), base_model)
        position = int(meta["data_position"])
        self.last_saved = self.last_complete = position
        return restored[STATE_ITEM], position
