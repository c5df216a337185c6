"""The training loop for `npo-jax unlearn` and `npo-jax finetune`.

Run folder layout:
    config.yaml           the resolved config
    metrics.jsonl         one JSON object per optimizer step
    tb/                   TensorBoard event files
    checkpoints/          Orbax CheckpointManager (step folders with `state` and `meta`), plus the
                          model's config.json and tokenizer files, so it exports as is
    reference_logprobs.npy  cached NPO reference log-probs of the forget set
    hf/                   the final params exported as an HF folder (unless turned off)

Faults (docs/reliability.md): SIGTERM/SIGINT finish the step, save, and raise `Preempted` (exit
75); a save killed half-way is an Orbax temporary folder, deleted with a warning at the next
start; each complete step gets a checksum manifest, checked before it is restored; a failed save
(disk full) or a NaN/inf step stops the run naming the last complete checkpoint. On several
hosts, each builds only the batch rows its devices hold, and the hosts agree before acting on
anything one of them saw alone (a signal, a missing cache file, a failed check).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.jax_utils import replicate
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from convert.orbax_to_hf import orbax_to_hf
from npo_jax import distributed
from npo_jax.checkpoint import STATE_ITEM, TOKENIZER_FILES, copy_side_files, remove_unfinished_saves, verify_step
from npo_jax.data.batches import StepPlan, retain_pairing, step_batch
from npo_jax.data.tofu import load_split
from npo_jax.data.tokenize import ChatFormat, encode_qa_pairs, load_tokenizer
from npo_jax.errors import NpoJaxError, Preempted
from npo_jax.fs import atomic_write_text, checksum_tree, warn, write_checksums
from npo_jax.losses import Objective
from npo_jax.model import abstract_model, split_params
from npo_jax.model_io import load_model
from npo_jax.optim import make_optimizer, warmup_steps
from npo_jax.reference import cache_key, cached_reference_logprobs, sequence_logprobs
from npo_jax.run_config import RunConfig, to_yaml
from npo_jax.sharding import make_mesh, param_shardings
from npo_jax.train_step import (
    BATCH_AXES,
    CompiledStep,
    batch_shardings,
    init_state,
    make_pmap_step,
    make_sharded_step,
    state_shardings,
    to_pmap_batch,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclass
class Layout:
    """How the effective batch maps onto devices: units per micro-batch x accumulation steps."""

    strategy: str
    n_devices: int
    units: int  # data-parallel shards = one unit (per_device_batch examples) each per micro-batch
    accum: int
    mesh: object = None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Layout:
        n = jax.device_count()
        p, o = cfg.parallel, cfg.optim
        if p.strategy == "pmap":
            mesh, units = None, n
        else:
            data = p.data if p.data > 0 else n // (p.fsdp * p.tensor)
            try:
                mesh = make_mesh(data, p.fsdp, p.tensor)
            except ValueError as e:
                raise NpoJaxError(f"config parallel: {e}") from None
            units = data * p.fsdp
        per_step = o.per_device_batch * units
        if o.effective_batch % per_step:
            raise NpoJaxError(f"config optim: effective_batch {o.effective_batch} is not a multiple of "
                              f"per_device_batch {o.per_device_batch} x {units} data-parallel devices")
        return cls(p.strategy, n, units, o.effective_batch // per_step, mesh)


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


def _drop_metrics_after(path: Path, step: int) -> None:
    """On resume, forget the records of steps after the restored checkpoint: they are run again.

    A last line without its newline is a record torn by a kill; it goes too.
    """
    if not path.is_file():
        return
    text = path.read_text()
    lines = [line for line in text.splitlines(keepends=True) if line.strip()]
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(kept))


def _tokenize_split(tokenizer, rows, fmt: ChatFormat, max_length: int):
    examples = encode_qa_pairs(tokenizer, [(r["question"], r["answer"]) for r in rows], fmt, max_length)
    return examples, sum(e.truncated for e in examples)


_TENSORSTORE_SPEC = re.compile(r"\s*\[tensorstore_spec='[^']*'\]")


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


class _StopSignals:
    """While active, SIGTERM and SIGINT only set a flag that the loop reads between steps.

    The first signal puts the previous handlers back, so a second one acts as before (terminate,
    KeyboardInterrupt) if the user does not want to wait for the checkpoint.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        self.received = signum
        self._restore()

    def _restore(self):
        for s, handler in self._previous.items():  # None: a handler set outside Python, not restorable
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __exit__(self, *exc):
        self._restore()

    def requested(self) -> bool:
        """Whether any host got a signal (a collective on several hosts: all stop at the same step)."""
        return distributed.any_process(self.received is not None)


class Trainer:
    def __init__(self, cfg: RunConfig, mode: str, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, max_steps: int | None = None):
        distributed.maybe_initialize()
        self.cfg, self.mode, self.progress = cfg, mode, progress
        self.out = Path(cfg.output_dir)
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path.home() / ".cache" / "npo_jax"
        _check_output(self.out, resume, overwrite)
        self.obj = Objective("finetune") if mode == "finetune" else Objective(
            cfg.method.name, cfg.method.beta, cfg.method.alpha, cfg.method.gamma, cfg.method.delta,
            cfg.method.retain_loss, cfg.method.reference)
        if mode == "unlearn" and cfg.method.name == "finetune":
            raise NpoJaxError("config method.name: 'finetune' is for `npo-jax finetune`")
        if cfg.optim.skip_nonfinite < 0:
            raise NpoJaxError(f"config optim.skip_nonfinite: {cfg.optim.skip_nonfinite} must be >= 0")
        self.layout = Layout.from_config(cfg)
        self._load_data()
        self._load_model()
        self.plan = StepPlan(len(self.forget), cfg.optim.effective_batch, cfg.optim.epochs, cfg.seed)
        self.total_steps = self.plan.total_steps if max_steps is None else min(max_steps, self.plan.total_steps)
        warm = warmup_steps(cfg.optim.warmup_epochs, len(self.forget), cfg.optim.effective_batch)
        self.tx, self.schedule = make_optimizer(
            self.params_template, lr=cfg.optim.lr, total_steps=self.plan.total_steps, warmup=warm,
            weight_decay=cfg.optim.weight_decay, max_grad_norm=cfg.optim.max_grad_norm,
            b1=cfg.optim.b1, b2=cfg.optim.b2, eps=cfg.optim.eps)
        if cfg.optim.skip_nonfinite:  # a non-finite gradient leaves params and optimizer state as they were
            self.tx = optax.apply_if_finite(self.tx, max_consecutive_errors=cfg.optim.skip_nonfinite)
        self.ckpt_dir = (self.out / "checkpoints").absolute()
        distributed.barrier("npo_jax_output_checked")  # no host may see the folder the primary creates now
        if distributed.is_primary():  # all input checked: only now is the output folder touched
            _prepare_output(self.out, overwrite and not resume)
            remove_unfinished_saves(self.ckpt_dir)
        cached = self.obj.method == "NPO" and self.obj.reference == "cached"
        self.ref_logp = self._reference_logprobs() if cached else None
        self._build_state()
        self.manager = ocp.CheckpointManager(
            self.ckpt_dir, item_names=(STATE_ITEM, "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep, create=True))
        self.start_step = 0
        self.last_saved = self.last_complete = None  # newest step saved (maybe still writing) / written
        self._in_flight: list[int] = []
        if resume and self.manager.latest_step() is not None:
            self._restore(self.manager.latest_step())
            self.last_saved = self.last_complete = self.start_step

    # -- setup ---------------------------------------------------------------------------------
    def _load_data(self) -> None:
        cfg = self.cfg
        tok_dir = cfg.model.tokenizer or cfg.model.path
        self.tokenizer = load_tokenizer(tok_dir)
        fmt = ChatFormat(cfg.data.system_prompt, cfg.data.date_string)
        tfds_dir = cfg.data.tfds_dir or (self.cache_dir / "tfds")
        first = cfg.data.finetune_split if self.mode == "finetune" else cfg.data.forget_split
        self.forget, n_trunc = _tokenize_split(self.tokenizer, load_split(first, cfg.data.dir, tfds_dir), fmt,
                                               cfg.data.max_length)
        self.truncated = {first: n_trunc}
        self.retain = self.pairing = None
        if self.obj.uses_retain:
            self.retain, r_trunc = _tokenize_split(
                self.tokenizer, load_split(cfg.data.retain_split, cfg.data.dir, tfds_dir), fmt, cfg.data.max_length)
            self.truncated[cfg.data.retain_split] = r_trunc
            self.pairing = retain_pairing(len(self.forget), len(self.retain), cfg.seed)
        eos = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        self.eot_id = eos

    def _load_model(self) -> None:
        cfg = self.cfg
        dtype = DTYPES[cfg.model.compute_dtype]
        shardings_for = None
        if self.layout.strategy == "sharded":
            shardings_for = lambda c: param_shardings(c, self.layout.mesh)  # noqa: E731
        loaded = load_model(cfg.model.path, shardings_for)
        self.side_files_dir = loaded.side_files_dir
        self.graphdef, _ = split_params(abstract_model(loaded.config, compute_dtype=dtype, remat=cfg.model.remat))
        # float32 master params; no second copy when they already are (keeping `loaded` would hold one)
        params = jax.tree.map(lambda x: x if x.dtype == jnp.float32 else x.astype(jnp.float32), loaded.params)
        self.params_template = params
        self.param_shardings = shardings_for(loaded.config) if shardings_for else None

    def _reference_logprobs(self) -> np.ndarray:
        cfg = self.cfg
        key = cache_key(cfg.model.path, self.forget, compute_dtype=cfg.model.compute_dtype,
                        eot_mask_quirk=cfg.data.eot_mask_quirk)

        def compute():
            return sequence_logprobs(self.graphdef, self.params_template, self.forget,
                                     buckets=cfg.data.length_buckets, pad_id=self.pad_id, eot_id=self.eot_id,
                                     eot_mask_quirk=cfg.data.eot_mask_quirk)

        cache = self.cache_dir / "reference_logprobs"
        # compute() is a collective on several hosts: if any host lacks the file (per-host caches,
        # a replaced host), all compute; cached_reference_logprobs names files KEY.npy
        have = (cache / f"{key}.npy").is_file()
        if distributed.any_process(not have) and have:
            values, hit = compute(), False
        else:
            values, hit = cached_reference_logprobs(cache, key, compute)
        if distributed.is_primary():
            np.save(self.out / "reference_logprobs.npy", values)
        self.reference_cache_hit = hit
        return values

    def _build_state(self) -> None:
        live = self.obj.needs_live_reference
        params = self.params_template
        if self.layout.strategy == "sharded":
            self.state_shardings = state_shardings(self.tx, params, self.param_shardings, self.layout.mesh)
            state = jax.jit(lambda p: init_state(p, self.tx), out_shardings=self.state_shardings)(params)
            self.ref_params = jax.tree.map(jnp.copy, params) if live else None
            self.step_fn = CompiledStep(make_sharded_step(self.graphdef, self.obj, self.tx, self.schedule,
                                                          self.layout.mesh, self.state_shardings, self.layout.units,
                                                          self.param_shardings if live else None))
        else:
            devices = jax.local_devices()
            host = jax.device_get(params)
            state = replicate(init_state(host, self.tx), devices)
            self.ref_params = replicate(host, devices) if live else None
            self.step_fn = CompiledStep(make_pmap_step(self.graphdef, self.obj, self.tx, self.schedule))
        self.state = state
        del self.params_template

    # -- checkpoints -----------------------------------------------------------------------------
    def _host_state(self):
        if self.layout.strategy == "pmap":
            return jax.tree.map(lambda x: x[0], self.state)
        return self.state

    def save(self, step: int) -> None:
        """Start an async save of `step` (after the previous one is complete and checksummed)."""
        self._finish_saves()
        meta = {"step": step, "data_position": step, "total_steps": self.plan.total_steps, "seed": self.cfg.seed,
                "mode": self.mode, "strategy": self.layout.strategy}
        try:
            self.manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(self._host_state()),
                                                               "meta": ocp.args.JsonSave(meta)}), force=True)
        except Exception as e:
            raise NpoJaxError(self._save_failed(step, e)) from e
        self.last_saved = step
        self._in_flight.append(step)

    def _finish_saves(self) -> None:
        """Wait for the saves in flight; then the primary records each new step's checksums.

        The manifest goes into the step folder once Orbax has renamed it into place, so a step
        without one is complete but unchecked (the run died in between), never half-written.
        """
        if not self._in_flight:
            return
        step = self._in_flight[-1]
        try:
            self.manager.wait_until_finished()
            if distributed.is_primary() and self.cfg.checkpoint.checksums:
                for s in self._in_flight:
                    write_checksums(self.ckpt_dir / str(s), checksum_tree(self.ckpt_dir / str(s)))
        except Exception as e:
            raise NpoJaxError(self._save_failed(step, e)) from e
        self.last_complete = step
        self._in_flight.clear()

    def _save_failed(self, step: int, e: BaseException) -> str:
        hint = " (out of disk space?)" if _out_of_space(e) else ""
        kept = (f"the last complete checkpoint, step {self.last_complete}, is intact" if self.last_complete
                else "no earlier checkpoint was written")
        return f"{self.ckpt_dir}: saving the checkpoint of step {step} failed{hint}: {_first_line(e)}; {kept}"

    def _restore(self, step: int) -> None:
        step_dir = self.ckpt_dir / str(step)
        failed = None
        if distributed.is_primary():  # one host reads the files; all learn the verdict
            try:
                verify_step(step_dir)
            except NpoJaxError as e:
                failed = e
        if distributed.any_process(failed is not None):
            raise failed or NpoJaxError(f"{step_dir}: failed its checksum check on process 0 (see its log)")
        host = self._host_state()
        if self.layout.strategy == "sharded":
            abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), host,
                                    self.state_shardings)
        else:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
        from npo_jax.checkpoint import check_saved_params

        check_saved_params(step_dir, host["params"])
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                **{STATE_ITEM: ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}))
        except Exception as e:
            raise NpoJaxError(f"{step_dir}: cannot restore the checkpoint ({_first_line(e)}); was it saved by a run "
                              f"with another model or optimizer config (e.g. optim.skip_nonfinite)?") from None
        meta = restored["meta"]
        if (meta["total_steps"], meta["seed"]) != (self.plan.total_steps, self.cfg.seed):
            raise NpoJaxError(f"{step_dir}: saved by a run of {meta['total_steps']} steps with seed {meta['seed']}; "
                              f"this config makes {self.plan.total_steps} steps with seed {self.cfg.seed} (the "
                              f"data order would differ: keep optim.effective_batch, optim.epochs, seed and the data)")
        state = restored[STATE_ITEM]
        if self.layout.strategy == "pmap":
            state = replicate(jax.device_get(state), jax.local_devices())
        self.state = state
        self.start_step = int(meta["data_position"])

    # -- the loop ----------------------------------------------------------------------------------
    def _local_rows(self, n: int) -> np.ndarray:
        """Which rows of an n-row micro-batch this process's devices hold (all of them on one host)."""
        if jax.process_count() == 1:
            return np.arange(n)
        if self.layout.strategy == "pmap":  # device d of the pmap takes rows [d*b, (d+1)*b)
            b, n_local = n // self.layout.n_devices, jax.local_device_count()
            lo = jax.process_index() * n_local
            return np.arange(lo * b, (lo + n_local) * b)
        sharding = NamedSharding(self.layout.mesh, PartitionSpec(None, BATCH_AXES))
        spans = {idx[1].indices(n)[:2] for idx in sharding.addressable_devices_indices_map((1, n)).values()}
        return np.concatenate([np.arange(lo, hi) for lo, hi in sorted(spans)])

    def _step_tokens(self, step: int) -> int:
        """Non-padding tokens in the whole step (all hosts), for tokens_per_s."""
        idx = self.plan.indices(step)
        tokens = sum(len(self.forget[i].input_ids) for i in idx)
        if self.retain is not None:
            tokens += sum(len(self.retain[j].input_ids) for j in self.pairing[idx])
        return tokens

    def _host_batch(self, step: int):
        """This host's rows of the step's batch as numpy arrays (no JAX calls), and the step's tokens;
        each host builds and places (`_place`) only its own rows."""
        cfg, accum = self.cfg, self.layout.accum
        n = cfg.optim.effective_batch // accum  # rows per micro-batch
        local = self._local_rows(n)
        rows = (np.arange(accum)[:, None] * n + local[None, :]).reshape(-1)
        host = step_batch(self.plan, step, self.forget, buckets=cfg.data.length_buckets, pad_id=self.pad_id,
                          eot_id=self.eot_id, eot_mask_quirk=cfg.data.eot_mask_quirk, retain=self.retain,
                          pairing=self.pairing, ref_logp=self.ref_logp, rows=rows)
        host.pop("forget_index")
        host = jax.tree.map(lambda x: x.reshape(accum, len(local), *x.shape[1:]), host)
        return host, self._step_tokens(step)

    def _place(self, host, tokens):
        if self.layout.strategy == "pmap":
            return to_pmap_batch(host, jax.local_device_count()), tokens
        accum, n = self.layout.accum, self.cfg.optim.effective_batch // self.layout.accum
        shardings = batch_shardings(host, self.layout.mesh)
        batch = jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, x, (accum, n, *x.shape[2:])),
                             host, shardings)
        return batch, tokens

    def _check_finite(self, step: int, metrics: dict) -> int | None:
        """Stop on a non-finite loss or gradient, unless optim.skip_nonfinite let optax skip it.

        Returns the number of updates skipped so far (skip mode), else None.
        """
        limit = self.cfg.optim.skip_nonfinite
        skipped = None
        if limit:
            guard = self.state["opt_state"]  # optax.ApplyIfFiniteState
            applied, in_a_row, skipped = (int(np.asarray(x).reshape(-1)[0]) for x in jax.device_get(
                (guard.last_finite, guard.notfinite_count, guard.total_notfinite)))
        if all(math.isfinite(v) for v in metrics.values()):
            return skipped
        bad = ", ".join(f"{k}={v}" for k, v in metrics.items() if not math.isfinite(v))
        if limit and not applied and in_a_row <= limit:
            warn(f"step {step}: non-finite {bad}; update skipped ({in_a_row} in a row, {skipped} in all)")
            return skipped
        why = f" ({in_a_row} in a row, more than optim.skip_nonfinite={limit})" if limit and not applied else ""
        kept = (f"the last good checkpoint (step {self.last_saved}) is kept" if self.last_saved
                else "nothing saved")
        raise NpoJaxError(f"step {step}: non-finite {bad}{why}; stopping, {kept}")

    def _stop(self, step: int, signum: int | None) -> None:
        if self.last_saved != step:
            self.save(step)
        self._finish_saves()
        why = signal.Signals(signum).name if signum else "a stop signal on another host"
        raise Preempted(f"{why}: stopped after step {step} of {self.total_steps}, checkpoint "
                        f"{self.ckpt_dir / str(step)} written; continue with --resume")

    def train(self) -> dict:
        cfg = self.cfg
        primary = distributed.is_primary()
        if primary:
            (self.out / "config.yaml").write_text(to_yaml(cfg))
            copy_side_files(self.side_files_dir, self.out / "checkpoints")
            if cfg.model.tokenizer:
                copy_side_files(Path(cfg.model.tokenizer), self.out / "checkpoints", TOKENIZER_FILES)
        writer = None
        if primary:
            from tensorboardX import SummaryWriter

            writer = SummaryWriter(str(self.out / "tb"))
        if primary:
            _drop_metrics_after(self.out / "metrics.jsonl", self.start_step)
        metrics_file = open(self.out / "metrics.jsonl", "a") if primary else None
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc=self.mode, unit="step",
                   disable=not (self.progress and primary))
        for split, n in self.truncated.items():
            if n and primary:
                tqdm.write(f"{split}: {n} examples longer than data.max_length={cfg.data.max_length} were truncated")
        last = {}
        with _StopSignals() as stop, contextlib.ExitStack() as closing:
            closing.callback(bar.close)
            if primary:
                closing.callback(writer.close)
                closing.callback(metrics_file.close)
            try:
                upcoming = self._host_batch(self.start_step) if self.start_step < self.total_steps else None
                for step in range(self.start_step, self.total_steps):
                    batch, tokens = self._place(*upcoming)
                    t0 = time.perf_counter()
                    self.state, metrics = self.step_fn(self.state, self.ref_params, batch)  # dispatched, not awaited
                    # the next batch's host arrays are built while this step runs; they are placed on
                    # the devices only after this step's metrics are read and checked
                    upcoming = self._host_batch(step + 1) if step + 1 < self.total_steps else None
                    metrics = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in jax.device_get(metrics).items()}
                    dt = time.perf_counter() - t0
                    skipped = self._check_finite(step + 1, metrics)
                    record = {"step": step + 1, "epoch": step // self.plan.steps_per_epoch, **metrics,
                              "tokens": tokens, "tokens_per_s": tokens / dt, "step_time_s": dt}
                    if skipped is not None:
                        record["skipped_nonfinite"] = skipped
                    last = record
                    if primary:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                        for k, v in record.items():
                            if k != "step":
                                writer.add_scalar(f"train/{k}", v, step + 1)
                    bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "forget_loss", "retain_loss", "lr",
                                                                      "tokens_per_s") if k in record})
                    bar.update()
                    every = cfg.checkpoint.every_steps
                    if every and (step + 1) % every == 0 and step + 1 < self.total_steps:
                        self.save(step + 1)
                    if stop.requested() and step + 1 < self.total_steps:
                        self._stop(step + 1, stop.received)
                if self.total_steps > (self.last_saved or 0):
                    self.save(self.total_steps)
                self._finish_saves()
            except BaseException:
                with contextlib.suppress(Exception):
                    self._finish_saves()  # a save in flight is of an earlier, good step: let it complete
                raise
        # signals act as usual again: the export is all-or-nothing, and --resume redoes it
        if cfg.checkpoint.export_hf and primary:
            orbax_to_hf(self.out / "checkpoints", self.out / "hf", dtype=cfg.checkpoint.export_dtype,
                        overwrite=True, progress=self.progress)
        info = {"steps": self.total_steps, "steps_per_epoch": self.plan.steps_per_epoch,
                "accumulation": self.layout.accum, "units_per_micro_batch": self.layout.units,
                "truncated": self.truncated, "last": last}
        if primary:
            (self.out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        return info

    def params(self):
        """Current params on the host (numpy)."""
        return jax.device_get(self._host_state()["params"])

