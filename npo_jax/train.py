"""The training loop for `npo-jax unlearn` and `npo-jax finetune`.

Run folder layout:
    config.yaml           the resolved config
    metrics.jsonl         one JSON object per optimizer step
    tb/                   TensorBoard event files
    checkpoints/          Orbax CheckpointManager (step folders with `state` and `meta`), plus the
                          model's config.json and tokenizer files, so it exports as is
    reference_logprobs.npy  cached NPO reference log-probs of the forget set
    hf/                   the final params exported as an HF folder (unless turned off)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax.jax_utils import replicate
from tqdm import tqdm

from convert.orbax_to_hf import orbax_to_hf
from npo_jax import distributed
from npo_jax.checkpoint import STATE_ITEM, TOKENIZER_FILES, copy_side_files
from npo_jax.data.batches import StepPlan, retain_pairing, step_batch
from npo_jax.data.tofu import load_split
from npo_jax.data.tokenize import ChatFormat, encode_qa, load_tokenizer
from npo_jax.errors import NpoJaxError
from npo_jax.fs import atomic_write_text
from npo_jax.losses import Objective
from npo_jax.model import abstract_model, split_params
from npo_jax.model_io import load_model
from npo_jax.optim import make_optimizer, warmup_steps
from npo_jax.reference import cache_key, cached_reference_logprobs, sequence_logprobs
from npo_jax.run_config import RunConfig, to_yaml
from npo_jax.sharding import make_mesh, param_shardings
from npo_jax.train_step import (
    batch_shardings,
    init_state,
    make_pmap_step,
    make_sharded_step,
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
    """On resume, forget the records of steps after the restored checkpoint: they are run again."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _tokenize_split(tokenizer, rows, fmt: ChatFormat, max_length: int):
    examples = [encode_qa(tokenizer, r["question"], r["answer"], fmt, max_length) for r in rows]
    return examples, sum(e.truncated for e in examples)


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
        if distributed.is_primary():  # all input checked: only now is the output folder touched
            _prepare_output(self.out, overwrite and not resume)
        cached = self.obj.method == "NPO" and self.obj.reference == "cached"
        self.ref_logp = self._reference_logprobs() if cached else None
        self._build_state()
        self.manager = ocp.CheckpointManager(
            (self.out / "checkpoints").absolute(), item_names=(STATE_ITEM, "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep, create=True))
        self.start_step = 0
        if resume and self.manager.latest_step() is not None:
            self._restore(self.manager.latest_step())

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

        values, hit = cached_reference_logprobs(self.cache_dir / "reference_logprobs", key, compute)
        if distributed.is_primary():
            np.save(self.out / "reference_logprobs.npy", values)
        self.reference_cache_hit = hit
        return values

    def _build_state(self) -> None:
        live = self.obj.needs_live_reference
        params = self.params_template
        if self.layout.strategy == "sharded":
            state = jax.jit(lambda p: init_state(p, self.tx))(params)
            self.state_shardings = jax.tree.map(lambda x: x.sharding, state)
            self.ref_params = jax.tree.map(jnp.copy, params) if live else None
            self.step_fn = make_sharded_step(self.graphdef, self.obj, self.tx, self.schedule, self.layout.mesh,
                                             self.state_shardings, self.layout.units,
                                             self.param_shardings if live else None)
        else:
            devices = jax.local_devices()
            host = jax.device_get(params)
            state = replicate(init_state(host, self.tx), devices)
            self.ref_params = replicate(host, devices) if live else None
            self.step_fn = make_pmap_step(self.graphdef, self.obj, self.tx, self.schedule)
        self.state = state
        del self.params_template

    # -- checkpoints -----------------------------------------------------------------------------
    def _host_state(self):
        if self.layout.strategy == "pmap":
            return jax.tree.map(lambda x: x[0], self.state)
        return self.state

    def save(self, step: int) -> None:
        meta = {"step": step, "data_position": step, "total_steps": self.plan.total_steps, "seed": self.cfg.seed,
                "mode": self.mode, "strategy": self.layout.strategy}
        self.manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(self._host_state()),
                                                           "meta": ocp.args.JsonSave(meta)}), force=True)

    def _restore(self, step: int) -> None:
        host = self._host_state()
        if self.layout.strategy == "sharded":
            abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), host,
                                    self.state_shardings)
        else:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}))
        state = restored[STATE_ITEM]
        if self.layout.strategy == "pmap":
            state = replicate(jax.device_get(state), jax.local_devices())
        self.state = state
        self.start_step = int(restored["meta"]["data_position"])

    # -- the loop ----------------------------------------------------------------------------------
    def _device_batch(self, step: int):
        cfg = self.cfg
        host = step_batch(self.plan, step, self.forget, buckets=cfg.data.length_buckets, pad_id=self.pad_id,
                          eot_id=self.eot_id, eot_mask_quirk=cfg.data.eot_mask_quirk, retain=self.retain,
                          pairing=self.pairing, ref_logp=self.ref_logp)
        tokens = int(host["forget"]["attention_mask"].sum())
        if "retain" in host:
            tokens += int(host["retain"]["attention_mask"].sum())
        host.pop("forget_index")
        accum = self.layout.accum
        host = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), host)
        if self.layout.strategy == "pmap":
            per_dev = to_pmap_batch(host, self.layout.n_devices)
            n_local = jax.local_device_count()
            lo = jax.process_index() * n_local
            return jax.tree.map(lambda x: x[lo:lo + n_local], per_dev), tokens
        shardings = batch_shardings(host, self.layout.mesh)
        batch = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]),
                             host, shardings)
        return batch, tokens

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
        last_saved = self.start_step if self.start_step else None
        try:
            for step in range(self.start_step, self.total_steps):
                batch, tokens = self._device_batch(step)
                t0 = time.perf_counter()
                self.state, metrics = self.step_fn(self.state, self.ref_params, batch)
                metrics = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                if not all(math.isfinite(v) for v in metrics.values()):
                    bad = ", ".join(f"{k}={v}" for k, v in metrics.items() if not math.isfinite(v))
                    kept = f"the last good checkpoint (step {last_saved}) is kept" if last_saved else "nothing saved"
                    raise NpoJaxError(f"step {step + 1}: non-finite {bad}; stopping, {kept}")
                record = {"step": step + 1, "epoch": step // self.plan.steps_per_epoch, **metrics,
                          "tokens": tokens, "tokens_per_s": tokens / dt, "step_time_s": dt}
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
                    last_saved = step + 1
            if self.total_steps > (last_saved or 0):
                self.save(self.total_steps)
            self.manager.wait_until_finished()
        finally:
            bar.close()
            self.manager.wait_until_finished()
            if primary:
                metrics_file.close()
                writer.close()
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

