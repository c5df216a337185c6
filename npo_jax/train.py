"""The training loop for `npo-jax unlearn` and `npo-jax finetune`.

Run folder layout:
    config.yaml           the resolved config
    metrics.jsonl         one JSON object per optimizer step
    tb/                   TensorBoard event files
    checkpoints/          Orbax CheckpointManager (step folders with `state` and `meta`), plus the
                          model's config.json and tokenizer files, so it exports as is, and
                          npo_jax_model.json: the attention-mask convention it was trained with
    reference_logprobs.npy  cached NPO reference log-probs of the forget set
    hf/                   the final params exported as an HF folder (unless turned off)

`Trainer` puts the parts together in order and runs the loop: the examples (`train_data`), where
state and batches live (`placement`), the checkpoints (`train_checkpoints`) and what happens to
each step's record (`train_hooks`). The loop builds the next step's host batch while the current
step runs, and checks every step's loss and gradient norm before anything acts on them.

Faults (docs/reliability.md): SIGTERM/SIGINT finish the step, save, and raise `Preempted` (exit
75); a save killed half-way is an Orbax temporary folder, deleted with a warning at the next
start; each complete step gets a checksum manifest, checked before it is restored; a failed save
(disk full) or a NaN/inf step stops the run naming the last complete checkpoint. On several
hosts, each builds only the batch rows its devices hold, and the hosts agree before acting on
anything one of them saw alone (a signal, a missing cache file, a failed check).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from convert.orbax_to_hf import orbax_to_hf
from npo_jax import distributed, dtypes
from npo_jax.checkpoint import TOKENIZER_FILES, copy_side_files, remove_unfinished_saves
from npo_jax.data.batches import StepPlan, step_batch
from npo_jax.errors import NpoJaxError, Preempted
from npo_jax.fs import cache_dir, warn
from npo_jax.lora import LoraModel, LoraSpec, base_checksum, init_adapters, load_peft_adapters
from npo_jax.lora import read_record as read_lora_record
from npo_jax.lora import write_record as write_lora_record
from npo_jax.losses import Objective
from npo_jax.mask_convention import resolve_eot_mask, write_record
from npo_jax.model import abstract_model, split_params
from npo_jax.model_io import load_model
from npo_jax.optim import make_optimizer, warmup_steps
from npo_jax.placement import Placement, make_placement
from npo_jax.run_config import RunConfig, to_yaml
from npo_jax.train_checkpoints import TrainCheckpoints
from npo_jax.train_data import forget_reference_logprobs, load_train_data
from npo_jax.train_hooks import Hook, MetricsFile, PeriodicSave, ProgressBar, StopOnSignal, StopSignals, TensorBoard


def _check_output(out: Path, resume: bool, overwrite: bool) -> None:
    exists = out.exists() and any(out.iterdir())
    if exists and not (resume or overwrite):
        raise NpoJaxError(f"{out}: output folder exists (pass --resume to continue it or --overwrite)")
    if resume and not exists:
        raise NpoJaxError(f"{out}: nothing to resume")


def _prepare_output(out: Path, overwrite: bool) -> None:
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _load_model(cfg: RunConfig, placement: Placement):
    """(graphdef, config, side-files folder, params on the placement's shardings): float32 master
    params; with LoRA the base params in `lora.base_dtype`, and the graphdef a `LoraModel`."""
    dtype = dtypes.dtype(cfg.model.compute_dtype, "model.compute_dtype")
    spec = LoraSpec.from_config(cfg.lora)
    if spec is not None and read_lora_record(Path(cfg.model.path)) is not None:
        raise NpoJaxError(f"model.path {cfg.model.path}: the checkpoints of a LoRA run; new adapters need a base of "
                          f"full weights: export it merged first (npo-jax convert orbax-to-hf {cfg.model.path} OUT)")
    loaded = load_model(cfg.model.path, placement.param_shardings)
    keep = jnp.float32 if spec is None else dtypes.dtype(cfg.lora.base_dtype, "lora.base_dtype")
    # no second copy when the params already have the dtype (keeping `loaded` would hold one)
    params = jax.tree.map(lambda x: x if x.dtype == keep else x.astype(keep), loaded.params)
    if spec is not None:
        graphdef = LoraModel(loaded.config, spec, compute_dtype=dtype, remat=cfg.model.remat, seed=cfg.seed)
    else:
        graphdef, _ = split_params(abstract_model(loaded.config, compute_dtype=dtype, remat=cfg.model.remat))
    return graphdef, loaded.config, loaded.side_files_dir, params


def _initial_adapters(cfg: RunConfig, config, spec: LoraSpec) -> dict:
    """A PEFT adapter folder's adapters (lora.init_from), else PEFT's init from the run's seed."""
    if cfg.lora.init_from:
        return load_peft_adapters(cfg.lora.init_from, config, spec)
    return init_adapters(config, spec, cfg.seed)


def _resolve_mask(cfg: RunConfig) -> RunConfig:
    """`cfg` with `data.eot_mask_quirk` resolved: as set, else the starting model's recorded
    convention, else open-unlearning's (npo_jax.mask_convention); what the run trains with and records."""
    say = print if distributed.is_primary() else None
    quirk = resolve_eot_mask(cfg.data.eot_mask_quirk, cfg.model.path, say)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eot_mask_quirk=quirk))


def _optimizer(cfg: RunConfig, params, plan: StepPlan, update_mask=None):
    o = cfg.optim
    warm = warmup_steps(o.warmup_epochs, plan.n_items, o.effective_batch)
    tx, schedule = make_optimizer(params, lr=o.lr, total_steps=plan.total_steps, warmup=warm,
                                  weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm, b1=o.b1, b2=o.b2,
                                  eps=o.eps, update_mask=update_mask)
    if o.skip_nonfinite:  # a non-finite gradient leaves params and optimizer state as they were
        tx = optax.apply_if_finite(tx, max_consecutive_errors=o.skip_nonfinite)
    return tx, schedule


def _check_finite(step: int, metrics: dict, opt_state, limit: int, last_saved: int | None) -> int | None:
    """Stop on a non-finite loss or gradient, unless optim.skip_nonfinite (`limit`) let optax skip it.

    Returns the number of updates skipped so far (skip mode), else None.
    """
    skipped = None
    if limit:
        guard = opt_state  # optax.ApplyIfFiniteState
        applied, in_a_row, skipped = (int(np.asarray(x).reshape(-1)[0]) for x in jax.device_get(
            (guard.last_finite, guard.notfinite_count, guard.total_notfinite)))
    if all(math.isfinite(v) for v in metrics.values()):
        return skipped
    bad = ", ".join(f"{k}={v}" for k, v in metrics.items() if not math.isfinite(v))
    if limit and not applied and in_a_row <= limit:
        warn(f"step {step}: non-finite {bad}; update skipped ({in_a_row} in a row, {skipped} in all)")
        return skipped
    why = f" ({in_a_row} in a row, more than optim.skip_nonfinite={limit})" if limit and not applied else ""
    kept = f"the last good checkpoint (step {last_saved}) is kept" if last_saved else "nothing saved"
    raise NpoJaxError(f"step {step}: non-finite {bad}{why}; stopping, {kept}")


class Trainer:
    """One run of `mode` ("unlearn" or "finetune") as `cfg` describes it, from `start_step` (0, or
    the newest checkpoint with `resume`) to `total_steps` (all of the plan's, or `max_steps`)."""

    def __init__(self, cfg: RunConfig, mode: str, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, max_steps: int | None = None):
        distributed.maybe_initialize()
        cfg = _resolve_mask(cfg)
        self.cfg, self.mode, self.progress = cfg, mode, progress
        self.out = Path(cfg.output_dir)
        _check_output(self.out, resume, overwrite)
        self.objective = Objective.finetune() if mode == "finetune" else Objective.from_config(cfg.method)
        self.placement = make_placement(cfg)
        cache = cache_dir(cfg.cache_dir)
        self.data = load_train_data(cfg, mode, self.objective.uses_retain, cache,
                                    with_refusals="alternate" in self.objective.module.FORGET_GROUPS)
        self.graphdef, config, self.side_files_dir, params = _load_model(cfg, self.placement)
        lora = isinstance(self.graphdef, LoraModel)
        # with LoRA the loaded params are the frozen base; the trained params are new adapters
        base, params = (params, _initial_adapters(cfg, config, self.graphdef.spec)) if lora else (None, params)
        self.base_model = ({"path": str(Path(cfg.model.path).resolve()), "sha256": base_checksum(cfg.model.path)}
                           if lora else None)
        self.plan = StepPlan(len(self.data.examples), cfg.optim.effective_batch, cfg.optim.epochs, cfg.seed,
                             cfg.optim.epoch_mode)
        self.total_steps = self.plan.total_steps if max_steps is None else min(max_steps, self.plan.total_steps)
        update_mask, method = None, self.objective.module
        if hasattr(method, "prepare"):  # RMU: its layer, control vector and trainable parameters
            self.objective, update_mask = method.prepare(self.objective, config, cfg.method, cfg.seed)
            if lora and update_mask is not None:  # the mask selects base parameters, which LoRA freezes
                raise NpoJaxError(f"method.name={cfg.method.name} selects base parameters to train "
                                  "(method.trainable_params_regex); it does not run with lora.rank > 0")
        tx, schedule = _optimizer(cfg, params, self.plan, update_mask)
        ckpt_dir = (self.out / "checkpoints").absolute()
        distributed.barrier("npo_jax_output_checked")  # no host may see the folder the primary creates now
        if distributed.is_primary():  # all input checked: only now is the output folder touched
            _prepare_output(self.out, overwrite and not resume)
            remove_unfinished_saves(ckpt_dir)
            if hasattr(method, "write_run_files"):
                method.write_run_files(self.objective, self.out)
        ref_graphdef, ref_params = (self.graphdef.base_graphdef, base) if lora else (self.graphdef, params)
        self.ref_logp = (forget_reference_logprobs(cfg, self.data, ref_graphdef, ref_params, cache, self.out)
                         if self.objective.cached_reference else None)
        self.state, self.ref_params, self.step_fn = self.placement.start(
            self.graphdef, config, params, self.objective, tx, schedule, base=base)
        del params, base, ref_params  # the state holds its own copy; the loaded one would take the room a restore needs
        self.checkpoints = TrainCheckpoints(ckpt_dir, cfg.checkpoint.keep, cfg.checkpoint.checksums)
        self.start_step = 0
        self._retain_eval = None  # compiled on first use (`_retain_mean`)
        if resume and (latest := self.checkpoints.latest_step()) is not None:
            state, self.start_step = self.checkpoints.restore(
                latest, self.placement.abstract_state(self.state), total_steps=self.plan.total_steps, seed=cfg.seed,
                data_order=self.data_order, base_model=self.base_model)
            self.state = self.placement.place_restored(state)

    @property
    def data_order(self) -> dict:
        """What, besides the seed and step count, decides each step's examples (saved and checked)."""
        return {"epoch_mode": self.plan.mode, "retain_pairing": self.cfg.data.retain_pairing}

    def save(self, step: int) -> None:
        """Start an async save of `step` (after the previous one is complete and checksummed)."""
        meta = {"step": step, "data_position": step, "total_steps": self.plan.total_steps, "seed": self.cfg.seed,
                "mode": self.mode, "strategy": self.placement.strategy, "data_order": self.data_order}
        if self.base_model is not None:
            meta["base_model"] = self.base_model
        self.checkpoints.save(step, self.placement.host_state(self.state), meta)

    def _preempt(self, step: int, signum: int | None) -> None:
        if self.checkpoints.last_saved != step:
            self.save(step)
        self.checkpoints.finish_saves()
        why = signal.Signals(signum).name if signum else "a stop signal on another host"
        raise Preempted(f"{why}: stopped after step {step} of {self.total_steps}, checkpoint "
                        f"{self.checkpoints.dir / str(step)} written; continue with --resume")

    def _host_batch(self, step: int):
        """This host's rows of the step's batch as numpy arrays (no JAX calls), and the step's tokens;
        each host builds and places (`Placement.place_batch`) only its own rows."""
        cfg, data, accum, n = self.cfg, self.data, self.placement.accum, self.placement.rows
        local = self.placement.local_rows(n)
        rows = (np.arange(accum)[:, None] * n + local[None, :]).reshape(-1)
        # the training examples are step_batch's "forget" group in either mode: the key the step reads
        host = step_batch(self.plan, step, data.examples, buckets=cfg.data.length_buckets, pad_id=data.pad_id,
                          eot_id=data.eot_id, eot_mask_quirk=cfg.data.eot_mask_quirk, retain=data.retain,
                          pairing=data.pairing, ref_logp=self.ref_logp, rows=rows, alternate=data.refusals,
                          loss_group=self.placement.loss_group if self.placement.span > 1 else None)
        host.pop("forget_index")
        host = jax.tree.map(lambda x: x.reshape(accum, len(local), *x.shape[1:]), host)
        return host, data.step_tokens(*self.plan.positions(step))

    def _epoch_end(self, done: int) -> None:
        """After `done` steps, if they end an epoch: the method's epoch update of its training state
        (`npo_jax.methods`; PDU's dual), given the epoch's count and a retain pass on demand."""
        update = getattr(self.objective.module, "epoch_end", None)
        epoch = self.plan.epoch(done - 1)
        if update is None or (done < self.plan.total_steps and self.plan.epoch(done) == epoch):
            return
        state = jax.device_get(self.placement.host_state(self.state)["method"])
        new = update(self.objective, state, epoch + 1, lambda: self._retain_mean(epoch))
        self.state = self.placement.with_method_state(self.state, new)

    def _retain_mean(self, epoch: int) -> float:
        """The mean retain term over the loss groups of the steps that start in `epoch`, no gradient."""
        if self._retain_eval is None:
            self._retain_eval = self.placement.retain_eval(self.graphdef, self.objective)
        steps = [k for k in range(self.plan.total_steps) if self.plan.epoch(k) == epoch]
        return float(np.mean([self._retain_eval(self.state, self.ref_params,
                                                self.placement.place_batch(self._host_batch(k)[0])) for k in steps]))

    def _hooks(self, signals: StopSignals, primary: bool) -> list[Hook]:
        hooks = []
        if primary:
            hooks += [MetricsFile(self.out / "metrics.jsonl", self.start_step), TensorBoard(self.out / "tb")]
            if self.progress:
                hooks.append(ProgressBar(self.total_steps, self.start_step, self.mode))
        return hooks + [PeriodicSave(self.cfg.checkpoint.every_steps, self.total_steps, self.save),
                        StopOnSignal(signals, self.total_steps, self._preempt)]

    def _loop(self, hooks: list[Hook]) -> dict:
        """The steps from start_step to total_steps; the last step's record ({} if none ran)."""
        record = {}
        upcoming = self._host_batch(self.start_step) if self.start_step < self.total_steps else None
        for step in range(self.start_step, self.total_steps):
            host, tokens = upcoming
            batch = self.placement.place_batch(host)
            t0 = time.perf_counter()
            self.state, metrics = self.step_fn(self.state, self.ref_params, batch)  # dispatched, not awaited
            # the next batch's host arrays are built while this step runs; they are placed on
            # the devices only after this step's metrics are read and checked
            upcoming = self._host_batch(step + 1) if step + 1 < self.total_steps else None
            metrics = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in jax.device_get(metrics).items()}
            dt = time.perf_counter() - t0
            skipped = _check_finite(step + 1, metrics, self.state["opt_state"], self.cfg.optim.skip_nonfinite,
                                    self.checkpoints.last_saved)
            record = {"step": step + 1, "epoch": self.plan.epoch(step), **metrics,
                      "tokens": tokens, "tokens_per_s": tokens / dt, "step_time_s": dt}
            if skipped is not None:
                record["skipped_nonfinite"] = skipped
            self._epoch_end(step + 1)  # before the hooks: a save of this step holds its result
            for hook in hooks:
                hook(record)
        return record

    def _write_run_files(self) -> None:
        (self.out / "config.yaml").write_text(to_yaml(self.cfg))
        copy_side_files(self.side_files_dir, self.out / "checkpoints")
        if self.cfg.model.tokenizer:
            copy_side_files(Path(self.cfg.model.tokenizer), self.out / "checkpoints", TOKENIZER_FILES)
        write_record(self.out / "checkpoints", self.cfg.data.eot_mask_quirk)  # export and eval read it
        if self.base_model is not None:  # what the adapters are and the base they need (export reads it)
            write_lora_record(self.out / "checkpoints", self.graphdef.spec, self.base_model)

    def train(self) -> dict:
        cfg = self.cfg
        primary = distributed.is_primary()
        if primary:
            self._write_run_files()
        with StopSignals() as signals, contextlib.ExitStack() as closing:
            hooks = self._hooks(signals, primary)
            for hook in hooks:
                closing.callback(hook.close)
            for split, n in self.data.truncated.items():
                if n and primary:
                    tqdm.write(f"{split}: {n} examples longer than data.max_length={cfg.data.max_length} "
                               "were truncated")
            try:
                last = self._loop(hooks)
                if self.total_steps > (self.checkpoints.last_saved or 0):
                    self.save(self.total_steps)
                self.checkpoints.finish_saves()
            except BaseException:
                with contextlib.suppress(Exception):
                    self.checkpoints.finish_saves()  # a save in flight is of an earlier, good step: let it complete
                raise
        # signals act as usual again: the export is all-or-nothing, and --resume redoes it
        if cfg.checkpoint.export_hf and primary:  # a LoRA run's adapters merged into the base
            orbax_to_hf(self.out / "checkpoints", self.out / "hf", dtype=cfg.checkpoint.export_dtype,
                        overwrite=True, progress=self.progress)
        info = {"steps": self.total_steps, "steps_per_epoch": self.plan.steps_per_epoch,
                "accumulation": self.placement.accum, "units_per_micro_batch": self.placement.units,
                "loss_group": self.placement.loss_group,
                "truncated": self.data.truncated, "last": last}
        if primary:
            (self.out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        return info

    def params(self):
        """Current params on the host (numpy)."""
        return jax.device_get(self.placement.host_state(self.state)["params"])
