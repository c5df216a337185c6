"""Benchmark our NPO train step against the PyTorch step an open-unlearning user runs.

    python scripts/bench_step.py --preset small --vs-torch            # the step against torch (docs/performance.md)
    python scripts/bench_step.py --preset small --vs-torch --json     # + one JSON object, last line
    python scripts/bench_step.py --preset small --reference live      # our step alone, in-process
    python scripts/bench_step.py --preset small --vs-torch --hugepages # all workers with THP (glibc)
    python scripts/bench_step.py --preset 1b-shape --dtype bfloat16 --vs-torch --one-at-a-time  # a GPU
    python scripts/bench_step.py --preset small --vs-torch --lora-rank 8 --json  # LoRA: ours against peft + torch

One optimizer step = forward + backward over `batch` forget and `batch` retain sequences of
`seq` tokens (random ids, the first half of each sequence masked as the prompt), gradient
clipping and an AdamW update. Variants, each in its own long-lived process (so peak resident
memory is its own; ours on a CPU with glibc set to reuse freed memory, as `npo-jax unlearn` sets it,
`npo_jax.memory.reuse_host_memory`; torch as a user runs it, or with `--torch-reuse-memory` set the
same way):
  ours_live    our jit step, NPO with a frozen reference copy (the same work as torch)
  ours_cached  our jit step, NPO with cached reference log-probs (no reference forward)
  torch        transformers.LlamaForCausalLM (sdpa attention), open-unlearning's formulas
               (summed sequence NLL, -(2/beta) logsigmoid(...), alpha x retain NLL), a frozen
               deepcopy as reference, torch.optim.AdamW, clip_grad_norm_ 1.0
With `--lora-rank R` the two variants are LoRA steps (rank R, alpha 2R, all seven projections, no
dropout; only the adapters trained, AdamW over them, the base model without adapters as the
reference, computed live in both):
  ours_lora    our jit step with `npo_jax.lora.LoraModel` (the step `npo-jax unlearn lora.rank=R` runs)
  torch_lora   peft.get_peft_model over the transformers model, the reference forward under
               `disable_adapter()` (no copy), torch.optim.AdamW over the adapters, clip_grad_norm_ 1.0
The workers build and warm up (compile, one more step) side by side, then take turns one step at
a time, the order rotated every round, so every variant's steps sample the same minutes of the
machine (its speed drifts by 15-25% within minutes); medians over each variant's steps.
Model FLOPs: 6 N per trained token + 2 N per reference-forward token (N = parameter count).
Our step runs the LM head only on the answer positions (`label_positions`), torch on every
position, as open-unlearning does; "executed" FLOPs count the LM head on the rows it runs on.
Each worker also times a large matmul in the step's dtype in its own framework, in turns like the
steps: the machine's matmul peak as that framework sees it, measured in the same run.

On an accelerator (jax's default backend, torch on CUDA when it has it) the step and matmul timings
wait for the device (`block_until_ready`, `torch.cuda.synchronize`), the matmul is 8192^3, and peak
device memory is reported too. `--one-at-a-time` runs the variants one after another instead of in
turns: one chip holds one variant's params and optimizer state at a time, and its speed does not
drift like a shared CPU's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npo_jax.config import LlamaConfig, read_config_dict  # noqa: E402
from npo_jax.data.batches import label_positions  # noqa: E402
from npo_jax.lora import LoraModel, LoraSpec, init_adapters  # noqa: E402
from npo_jax.losses import Objective  # noqa: E402
from npo_jax.memory import reuse_host_memory  # noqa: E402
from npo_jax.model import LlamaForCausalLM, split_params  # noqa: E402
from npo_jax.optim import make_optimizer  # noqa: E402
from npo_jax.run_config import LORA_TARGETS  # noqa: E402
from npo_jax.sharding import make_mesh, param_shardings  # noqa: E402
from npo_jax.train_step import CompiledStep, batch_shardings, init_state, make_sharded_step  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
PRESETS = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "small": dict(vocab_size=32768, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "1b-shape": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                     rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "3b-shape": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                     num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                     rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
}


def build(cfg: LlamaConfig, dtype, remat: str, seed: int = 0):
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed), compute_dtype=dtype, remat=remat)
    return split_params(model)


def random_batch(cfg: LlamaConfig, batch: int, seq: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def group():
        ids = rng.integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32)
        labels = ids.copy()
        labels[:, : seq // 2] = -100
        return {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids),
                "label_positions": label_positions(labels, seq // 2)}

    return {"forget": group(), "retain": group(), "forget_ref_logp": rng.normal(-50, 5, batch).astype(np.float32)}


MATMUL_TURNS = 10


def matmul_size() -> int:
    """n of the n x n x n matmul that measures each framework's peak: large enough to be compute-bound."""
    return 2048 if jax.default_backend() == "cpu" else 8192


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Worker:
    """One variant: `step()` runs one optimizer step, `matmul()` one n x n x n matmul (step dtype); the
    worker times them and keeps the timings (and each step's minor page faults) for `figures`."""

    def __init__(self, step, matmul, n_params: int, head_params: int, head_rows: float, live: bool,
                 device_peak_bytes=lambda: None):
        self.step, self.matmul, self.device_peak_bytes = step, matmul, device_peak_bytes
        self.n_params, self.head_params, self.head_rows, self.live = n_params, head_params, head_rows, live
        self.first_s, self.times, self.faults, self.matmul_times = 0.0, [], [], []

    def warm_up(self) -> None:
        """The first call (compile included, reported as compile_s) and one more, neither timed."""
        self.first_s = _seconds(self.step)
        self.step()

    def timed_step(self) -> float:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # fresh pages of the step's buffers
        self.times.append(_seconds(self.step))
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return self.times[-1]

    def timed_matmul(self) -> float:
        self.matmul_times.append(_seconds(self.matmul))
        return self.matmul_times[-1]

    def figures(self, batch: int, seq: int) -> dict:
        """Model FLOPs count 6N per trained token (2N per reference token) whatever the implementation
        does; executed FLOPs count the LM head only on the rows it runs on (`head_rows`: fraction of
        positions), the matmul work actually done (attention excluded in both)."""
        trained = 2 * batch * seq
        ref_tokens = batch * seq if self.live else 0
        dt = statistics.median(self.times)
        peak = 2 * matmul_size()**3 / statistics.median(self.matmul_times) / 1e9
        gflops = (6 * self.n_params * trained + 2 * self.n_params * ref_tokens) / dt / 1e9
        body = self.n_params - self.head_params
        executed = (6 * trained + 2 * ref_tokens) * (body + self.head_params * self.head_rows) / dt / 1e9
        device_bytes = self.device_peak_bytes()
        return {"params": self.n_params, "tokens_per_step": trained, "step_s": dt, "step_times": self.times,
                "compile_s": self.first_s, "tokens_per_s": trained / dt, "gflops": gflops,
                "executed_gflops": executed, "matmul_peak_gflops": peak, "fraction_of_peak": gflops / peak,
                "executed_fraction_of_peak": executed / peak,
                "minor_faults_per_step": statistics.median(self.faults),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_device_mb": None if device_bytes is None else device_bytes / 2**20}


def jax_matmul(dtype, n: int):
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)).astype(dtype)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    return lambda: mm(a, a).block_until_ready()


def jax_device_peak_bytes():
    """Peak bytes in use on the (first) accelerator; None on the CPU, which reports no such figure."""
    if jax.default_backend() == "cpu":
        return None
    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def torch_matmul(dtype, n: int, device):
    import torch

    a = torch.from_numpy(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)).to(device, dtype)
    sync = torch.cuda.synchronize if a.is_cuda else lambda: None
    a @ a
    sync()

    def run():
        a @ a
        sync()

    return run


def ours(cfg: LlamaConfig, *, batch: int, seq: int, dtype: str, reference: str, remat: str,
         reuse_memory: bool = True) -> Worker:
    if reuse_memory:  # glibc as `npo-jax unlearn` sets it (on a CPU), before the first jax computation
        reuse_host_memory()
    compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    graphdef, params = build(cfg, compute, remat)
    mesh = make_mesh(1, 1, 1)
    shardings = param_shardings(cfg, mesh)
    params = jax.device_put(params, shardings)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    obj = Objective("NPO", beta=0.1, alpha=2.0, reference=reference)
    tx, schedule = make_optimizer(params, lr=1e-5, total_steps=1000, warmup=0, weight_decay=0.01, max_grad_norm=1.0)
    state = jax.jit(lambda p: init_state(p, tx))(params)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    ref = jax.tree.map(jnp.copy, params) if obj.needs_live_reference else None
    del params
    step = CompiledStep(make_sharded_step(graphdef, obj, tx, schedule, mesh, state_shardings, units=1,
                                          ref_shardings=shardings if ref is not None else None))  # as the trainer
    return _jax_worker(step, state, ref, cfg, mesh, batch=batch, seq=seq, compute=compute, n_params=n_params,
                       live=reference == "live")


def _jax_worker(step, state, ref, cfg, mesh, *, batch: int, seq: int, compute, n_params: int, live: bool) -> Worker:
    """A Worker that runs `step` on one random micro-batch placed on `mesh`, the state carried."""
    host = jax.tree.map(lambda x: x[None], random_batch(cfg, batch, seq))
    if live:
        host.pop("forget_ref_logp")
    dev = jax.device_put(host, batch_shardings(host, mesh))
    box = {"state": state}

    def one():
        box["state"], metrics = step(box["state"], ref, dev)
        jax.block_until_ready(metrics)

    head_rows = (seq - seq // 2) / seq  # label_positions: the answer half of each sequence
    return Worker(one, jax_matmul(compute, matmul_size()), n_params, cfg.vocab_size * cfg.hidden_size, head_rows,
                  live, jax_device_peak_bytes)


def pytorch(raw: dict, *, batch: int, seq: int, dtype: str, reuse_memory: bool = False) -> Worker:
    """The open-unlearning NPO step (NPO trainer + HF Trainer defaults) in PyTorch, on CUDA when torch has it
    (the model built there, in `dtype` like open-unlearning's bf16 runs, optimizer state included)."""
    import copy

    if reuse_memory:  # a what-if (--torch-reuse-memory): not what an open-unlearning user runs
        reuse_host_memory()
    import torch
    import transformers

    from npo_jax.parity.torch_objective import batch_nll, hf_loss, npo_loss

    torch.manual_seed(0)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    config = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"},
                                      attn_implementation="sdpa")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with device:
        model = transformers.LlamaForCausalLM(config).to(tdtype).train()
    assert model.config._attn_implementation == "sdpa"
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    host = random_batch(LlamaConfig.from_hf_dict(raw, "bench"), batch, seq)
    forget, retain = ({k: torch.from_numpy(v).long().to(device) for k, v in host[g].items() if k != "label_positions"}
                      for g in ("forget", "retain"))
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def one():
        with torch.no_grad():
            ref_nll = batch_nll(ref, forget)
        loss = 1.0 * npo_loss(model, ref_nll, forget, beta=0.1) + 2.0 * hf_loss(model, retain)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    head = config.vocab_size * config.hidden_size
    peak = (lambda: torch.cuda.max_memory_allocated()) if device.type == "cuda" else (lambda: None)
    return Worker(one, torch_matmul(tdtype, matmul_size(), device), n_params, head, 1.0, True,  # logits everywhere
                  peak)


def ours_lora(cfg: LlamaConfig, *, batch: int, seq: int, dtype: str, remat: str, rank: int) -> Worker:
    """Our LoRA NPO step as the trainer builds it: adapters trained, the base the frozen (live) reference."""
    reuse_host_memory()
    compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    _, base = build(cfg, compute, remat)
    base = jax.tree.map(lambda x: x.astype(compute), base)  # lora.base_dtype = the compute dtype
    spec = LoraSpec(rank, 2.0 * rank, 0.0, LORA_TARGETS)
    lora = LoraModel(cfg, spec, compute_dtype=compute, remat=remat)
    mesh = make_mesh(1, 1, 1)
    base_shardings = param_shardings(cfg, mesh)
    base = jax.device_put(base, base_shardings)
    adapters = jax.device_put(init_adapters(cfg, spec, 0), NamedSharding(mesh, PartitionSpec()))
    n_params = sum(x.size for x in jax.tree.leaves(base))
    obj = Objective("NPO", beta=0.1, alpha=2.0, reference="live")
    tx, schedule = make_optimizer(adapters, lr=1e-5, total_steps=1000, warmup=0, weight_decay=0.01,
                                  max_grad_norm=1.0)
    state = jax.jit(lambda p: init_state(p, tx))(adapters)
    step = CompiledStep(make_sharded_step(lora, obj, tx, schedule, mesh, jax.tree.map(lambda x: x.sharding, state),
                                          units=1, ref_shardings=base_shardings))
    return _jax_worker(step, state, base, cfg, mesh, batch=batch, seq=seq, compute=compute, n_params=n_params,
                       live=True)


def pytorch_lora(raw: dict, *, batch: int, seq: int, dtype: str, rank: int) -> Worker:
    """The same LoRA NPO step with peft + torch: open-unlearning's formulas over a PeftModel, the
    reference the base model (adapters disabled, no copy), AdamW over the adapters."""
    import peft
    import torch
    import transformers

    from npo_jax.parity.torch_objective import batch_nll, hf_loss, npo_loss

    torch.manual_seed(0)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    config = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"},
                                      attn_implementation="sdpa")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with device:
        base = transformers.LlamaForCausalLM(config).to(tdtype)
    n_params = sum(p.numel() for p in base.parameters())
    lora_config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    model = peft.get_peft_model(base, lora_config).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.01)
    host = random_batch(LlamaConfig.from_hf_dict(raw, "bench"), batch, seq)
    forget, retain = ({k: torch.from_numpy(v).long().to(device) for k, v in host[g].items() if k != "label_positions"}
                      for g in ("forget", "retain"))
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def one():
        with torch.no_grad(), model.disable_adapter():
            ref_nll = batch_nll(model, forget)
        loss = 1.0 * npo_loss(model, ref_nll, forget, beta=0.1) + 2.0 * hf_loss(model, retain)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    peak = (lambda: torch.cuda.max_memory_allocated()) if device.type == "cuda" else (lambda: None)
    return Worker(one, torch_matmul(tdtype, matmul_size(), device), n_params, config.vocab_size * config.hidden_size,
                  1.0, True, peak)


VARIANTS = ("ours_live", "ours_cached", "torch")
LORA_VARIANTS = ("ours_lora", "torch_lora")
PLAIN_MALLOC = "ours_cached_plain_glibc"  # --malloc-ab: our cached step without reuse_host_memory


def make_worker(variant: str, args) -> Worker:
    raw = model_dict(args)
    if variant == "torch_lora":
        return pytorch_lora(raw, batch=args.batch, seq=args.seq, dtype=args.dtype, rank=args.lora_rank)
    if variant == "ours_lora":
        return ours_lora(LlamaConfig.from_hf_dict(raw, str(args.config or args.preset)), batch=args.batch,
                         seq=args.seq, dtype=args.dtype, remat=args.remat, rank=args.lora_rank)
    if variant == "torch":
        return pytorch(raw, batch=args.batch, seq=args.seq, dtype=args.dtype, reuse_memory=args.torch_reuse_memory)
    cfg = LlamaConfig.from_hf_dict(raw, str(args.config or args.preset))
    return ours(cfg, batch=args.batch, seq=args.seq, dtype=args.dtype, remat=args.remat,
                reference="live" if variant == "ours_live" else "cached", reuse_memory=variant != PLAIN_MALLOC)


def model_dict(args) -> dict:
    return read_config_dict(args.config) if args.config else {"model_type": "llama", **PRESETS[args.preset]}


REPLY = "@@ "  # marks the protocol's lines on a worker's stdout (libraries may print there too)


def serve(variant: str, args) -> None:
    """Worker process: build, compile and warm up, then answer `step` / `matmul` / `done` on stdin."""
    w = make_worker(variant, args)
    w.warm_up()
    commands = {"step": w.timed_step, "matmul": w.timed_matmul}
    print(REPLY + "ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "done":
            print(REPLY + json.dumps(w.figures(args.batch, args.seq)), flush=True)
            return
        print(REPLY + str(commands[cmd]()), flush=True)


def _reply(proc, variant: str) -> str:
    for line in proc.stdout:
        if line.startswith(REPLY):
            return line[len(REPLY):].strip()
    sys.exit(f"{variant} worker failed:\n{proc.stderr.read()[-3000:]}")


def vs_torch(args) -> dict:
    """Each variant a worker process; all taking turns step by step (or, with --one-at-a-time, one
    worker after another); medians per variant."""
    argv = [sys.executable, __file__, "--batch", str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype,
            "--remat", args.remat, "--lora-rank", str(args.lora_rank)]
    argv += ["--torch-reuse-memory"] if args.torch_reuse_memory else []
    argv += ["--config", str(args.config)] if args.config else ["--preset", args.preset]
    env = os.environ.copy()
    if args.hugepages:  # glibc >= 2.35: transparent huge pages for malloc's large blocks, every worker alike
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=1"]))

    def start(v: str) -> None:
        procs[v] = subprocess.Popen([*argv, "--worker", v], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env)
        _reply(procs[v], v)  # ready: built, compiled, warmed up

    def ask(v: str, cmd: str) -> str:
        procs[v].stdin.write(cmd + "\n")
        procs[v].stdin.flush()
        return _reply(procs[v], v)

    def turns(variants, cmd: str, n: int) -> None:
        k = len(variants)
        for r in range(n):
            for v in variants[r % k:] + variants[:r % k]:
                time.sleep(0.2)  # let the previous worker's idle threads stop spinning
                ask(v, cmd)

    procs, res = {}, {}
    try:
        variants = [*VARIANTS, PLAIN_MALLOC] if args.malloc_ab else list(VARIANTS)
        variants = list(LORA_VARIANTS) if args.lora_rank else variants
        for group in ([[v] for v in variants] if args.one_at_a_time else [variants]):
            for v in group:
                start(v)
            turns(group, "step", args.steps)
            turns(group, "matmul", MATMUL_TURNS)
            for v in group:
                res[v] = json.loads(ask(v, "done"))
                procs.pop(v).wait()  # its memory (a chip's, too) is free before the next worker starts
    finally:
        for p in procs.values():
            p.kill()
    if args.lora_rank:
        return {**res, "ratio_lora": res["ours_lora"]["tokens_per_s"] / res["torch_lora"]["tokens_per_s"],
                "rss_ratio_lora": res["ours_lora"]["peak_rss_mb"] / res["torch_lora"]["peak_rss_mb"]}
    return {**res, "ratio_live": res["ours_live"]["tokens_per_s"] / res["torch"]["tokens_per_s"],
            "ratio_cached": res["ours_cached"]["tokens_per_s"] / res["torch"]["tokens_per_s"],
            "fraction_of_peak": res["ours_live"]["fraction_of_peak"],
            "executed_fraction_of_peak": res["ours_live"]["executed_fraction_of_peak"],
            "rss_ratio_live": res["ours_live"]["peak_rss_mb"] / res["torch"]["peak_rss_mb"]}


def _mb(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def print_table(res: dict, args) -> None:
    name = args.config or args.preset
    torch_key = "torch_lora" if args.lora_rank else "torch"
    if args.lora_rank:
        print(f"LoRA rank {args.lora_rank}, alpha {2 * args.lora_rank}, all seven projections; reference live")
    print(f"{name}: {res[torch_key]['params'] / 1e6:.1f}M params, {args.dtype}, batch {args.batch}+{args.batch} x "
          f"{args.seq}, {args.steps} steps each ({'one variant at a time' if args.one_at_a_time else 'in turns'}), "
          f"{os.cpu_count()} CPUs{', torch with our glibc settings' if args.torch_reuse_memory else ''}"
          f"{', huge pages' if args.hugepages else ''}")
    print("(model GFLOP/s: 6N per trained token + 2N per reference token; executed: the LM head counted only on\n"
          " the rows it runs on, answer positions for ours, every position for torch)")
    print(f"{'variant':<23} {'tokens/s':>9} {'vs torch':>9} {'model GF/s':>10} {'of peak':>8} {'executed GF/s':>13} "
          f"{'of peak':>8} {'matmul peak':>12} {'peak RSS MB':>12} {'device MB':>10} {'compile s':>10} "
          f"{'faults/step':>12}")
    for v in (v for v in (*VARIANTS, PLAIN_MALLOC, *LORA_VARIANTS) if v in res):
        r = res[v]
        print(f"{v:<23} {r['tokens_per_s']:9.1f} {r['tokens_per_s'] / res[torch_key]['tokens_per_s']:8.2f}x "
              f"{r['gflops']:10.1f} {r['fraction_of_peak']:8.1%} {r['executed_gflops']:13.1f} "
              f"{r['executed_fraction_of_peak']:8.1%} {r['matmul_peak_gflops']:12.1f} "
              f"{r['peak_rss_mb']:12.0f} {_mb(r['peak_device_mb']):>10} {r['compile_s']:10.1f} "
              f"{r['minor_faults_per_step']:12.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--config", type=Path, help="an HF config.json instead of a preset")
    ap.add_argument("--batch", type=int, default=4, help="forget (and retain) sequences per step")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--reference", choices=["cached", "live"], default="cached")
    ap.add_argument("--remat", choices=["none", "full", "dots"], default="dots",
                    help="our step's remat policy (the trainer's default: dots)")
    ap.add_argument("--steps", type=int, default=15, help="timed steps per variant, after compile and one warm-up")
    ap.add_argument("--vs-torch", action="store_true", help="ours (live, cached) and the PyTorch step, side by side")
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="with --vs-torch: the variants one after another, not in turns (one accelerator's memory)")
    ap.add_argument("--hugepages", action="store_true",
                    help="with --vs-torch: run every worker with GLIBC_TUNABLES=glibc.malloc.hugetlb=1")
    ap.add_argument("--torch-reuse-memory", action="store_true",
                    help="with --vs-torch: glibc in the torch worker set as ours (npo_jax.memory.reuse_host_memory); "
                         "a what-if, not what an open-unlearning user runs")
    ap.add_argument("--malloc-ab", action="store_true",
                    help=f"with --vs-torch: a fourth worker, {PLAIN_MALLOC} (our cached step with glibc's defaults)")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="with --vs-torch: the LoRA step of this rank, ours against peft + torch")
    ap.add_argument("--worker", choices=(*VARIANTS, PLAIN_MALLOC, *LORA_VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON object (last line)")
    args = ap.parse_args()
    if args.worker:
        serve(args.worker, args)
        return
    if args.vs_torch:
        res = vs_torch(args)
        print_table(res, args)
        if args.json:
            print(json.dumps(res))
        return
    variant = "ours_live" if args.reference == "live" else "ours_cached"
    w = make_worker(variant, args)
    w.warm_up()
    for _ in range(args.steps):
        w.timed_step()
    for _ in range(MATMUL_TURNS):
        w.timed_matmul()
    r = w.figures(args.batch, args.seq)
    name = args.config or args.preset
    print(f"{name}: {r['params'] / 1e6:.1f}M params, {args.dtype}, batch {args.batch}+{args.batch} x {args.seq}, "
          f"reference {args.reference}, remat {args.remat}, {jax.devices()[0].platform}")
    print(f"{'step s':>8} {'tokens/s':>10} {'GFLOP/s':>9} {'of peak':>8} {'peak RSS MB':>12} {'compile s':>10} "
          f"{'page faults/step':>17}")
    print(f"{r['step_s']:8.3f} {r['tokens_per_s']:10.1f} {r['gflops']:9.1f} {r['fraction_of_peak']:8.1%} "
          f"{r['peak_rss_mb']:12.0f} {r['compile_s']:10.1f} {r['minor_faults_per_step']:17.0f}")
    if args.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
