"""Benchmark our NPO train step against the PyTorch step an open-unlearning user runs.

    python scripts/bench_step.py --preset small --vs-torch            # the table of issue 6
    python scripts/bench_step.py --preset small --vs-torch --json     # + one JSON object, last line
    python scripts/bench_step.py --preset small --reference live      # our step alone, in-process

One optimizer step = forward + backward over `batch` forget and `batch` retain sequences of
`seq` tokens (random ids, the first half of each sequence masked as the prompt), gradient
clipping and an AdamW update. Variants, each in its own fresh process (so peak resident memory
is its own), alternated round by round:
  ours_live    our jit step, NPO with a frozen reference copy (the same work as torch)
  ours_cached  our jit step, NPO with cached reference log-probs (no reference forward)
  torch        transformers.LlamaForCausalLM (sdpa attention), open-unlearning's formulas
               (summed sequence NLL, -(2/beta) logsigmoid(...), alpha x retain NLL), a frozen
               deepcopy as reference, torch.optim.AdamW, clip_grad_norm_ 1.0
Model FLOPs: 6 N per trained token + 2 N per reference-forward token (N = parameter count).
Our step runs the LM head only on the answer positions (`label_positions`), torch on every
position, as open-unlearning does; "executed" FLOPs count the LM head on the rows it runs on.
Each worker also times a large float32 matmul in its own framework: the machine's matmul peak
as that framework sees it, measured in the same run. Warm-up (compile, first steps) excluded;
per variant the median over rounds of each round's median step time.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npo_jax.config import LlamaConfig, read_config_dict  # noqa: E402
from npo_jax.data.batches import label_positions  # noqa: E402
from npo_jax.losses import Objective  # noqa: E402
from npo_jax.model import LlamaForCausalLM, split_params  # noqa: E402
from npo_jax.optim import make_optimizer  # noqa: E402
from npo_jax.sharding import make_mesh, param_shardings  # noqa: E402
from npo_jax.train_step import CompiledStep, batch_shardings, init_state, make_sharded_step  # noqa: E402

PRESETS = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "small": dict(vocab_size=32768, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "1b-shape": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                     rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192}),
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


def _timed(fn, steps: int, warmup: int = 1) -> tuple[float, list[float]]:
    """(first call seconds, per-step seconds after `warmup` more calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, times


def _figures(n_params: int, head_params: int, head_rows: float, batch: int, seq: int, live: bool, first_s: float,
             times: list[float], peak_gflops: float) -> dict:
    """Model FLOPs count 6N per trained token (2N per reference token) whatever the implementation
    does; executed FLOPs count the LM head only on the rows it runs on (`head_rows`: fraction of
    positions), the matmul work actually done (attention excluded in both)."""
    trained = 2 * batch * seq
    ref_tokens = batch * seq if live else 0
    dt = statistics.median(times)
    gflops = (6 * n_params * trained + 2 * n_params * ref_tokens) / dt / 1e9
    body = n_params - head_params
    executed = (6 * trained + 2 * ref_tokens) * (body + head_params * head_rows) / dt / 1e9
    return {"params": n_params, "tokens_per_step": trained, "step_s": dt, "step_times": times,
            "compile_s": first_s, "tokens_per_s": trained / dt, "gflops": gflops, "executed_gflops": executed,
            "matmul_peak_gflops": peak_gflops, "fraction_of_peak": gflops / peak_gflops,
            "executed_fraction_of_peak": executed / peak_gflops,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def matmul_peak_jax(n: int = 2048, reps: int = 10) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    mm = jax.jit(lambda x, y: x @ y)
    _, times = _timed(lambda: mm(a, a).block_until_ready(), reps)
    return 2 * n**3 / statistics.median(times) / 1e9


def matmul_peak_torch(n: int = 2048, reps: int = 10) -> float:
    import torch

    a = torch.from_numpy(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    _, times = _timed(lambda: a @ a, reps)
    return 2 * n**3 / statistics.median(times) / 1e9


def bench_ours(cfg: LlamaConfig, *, batch: int, seq: int, dtype: str, reference: str, remat: str, steps: int) -> dict:
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
    host = jax.tree.map(lambda x: x[None], random_batch(cfg, batch, seq))
    if reference == "live":
        host.pop("forget_ref_logp")
    dev = jax.device_put(host, batch_shardings(host, mesh))
    box = {"state": state}

    def one():
        box["state"], metrics = step(box["state"], ref, dev)
        jax.block_until_ready(metrics)

    first, times = _timed(one, steps)
    peak = matmul_peak_jax()
    head_rows = (seq - seq // 2) / seq  # label_positions: the answer half of each sequence
    return _figures(n_params, cfg.vocab_size * cfg.hidden_size, head_rows, batch, seq, reference == "live", first,
                    times, peak)


def bench_torch(raw: dict, *, batch: int, seq: int, dtype: str, steps: int) -> dict:
    """The open-unlearning NPO step (NPO trainer + HF Trainer defaults) in PyTorch."""
    import copy

    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from ou_reference import batch_nll, hf_loss, npo_loss

    torch.manual_seed(0)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    config = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"},
                                      attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).to(tdtype).train()
    assert model.config._attn_implementation == "sdpa"
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    host = random_batch(LlamaConfig.from_hf_dict(raw, "bench"), batch, seq)
    forget = {k: torch.from_numpy(v).long() for k, v in host["forget"].items()}
    retain = {k: torch.from_numpy(v).long() for k, v in host["retain"].items()}

    def one():
        with torch.no_grad():
            ref_nll = batch_nll(ref, forget)
        loss = 1.0 * npo_loss(model, ref_nll, forget, beta=0.1) + 2.0 * hf_loss(model, retain)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    first, times = _timed(one, steps)
    peak = matmul_peak_torch()
    head = config.vocab_size * config.hidden_size
    return _figures(n_params, head, 1.0, batch, seq, True, first, times, peak)  # logits at every position


VARIANTS = ("ours_live", "ours_cached", "torch")


def run_worker(variant: str, args) -> dict:
    raw = model_dict(args)
    if variant == "torch":
        return bench_torch(raw, batch=args.batch, seq=args.seq, dtype=args.dtype, steps=args.steps)
    cfg = LlamaConfig.from_hf_dict(raw, str(args.config or args.preset))
    return bench_ours(cfg, batch=args.batch, seq=args.seq, dtype=args.dtype, remat=args.remat, steps=args.steps,
                      reference="live" if variant == "ours_live" else "cached")


def model_dict(args) -> dict:
    return read_config_dict(args.config) if args.config else {"model_type": "llama", **PRESETS[args.preset]}


def vs_torch(args) -> dict:
    """Each variant in a fresh subprocess, the order rotated every round; medians over rounds."""
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    argv = [sys.executable, __file__, "--batch", str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype,
            "--remat", args.remat, "--steps", str(args.steps)]
    argv += ["--config", str(args.config)] if args.config else ["--preset", args.preset]
    for r in range(args.rounds):
        for variant in VARIANTS[r % 3:] + VARIANTS[:r % 3]:
            out = subprocess.run([*argv, "--worker", variant], capture_output=True, text=True, env=os.environ.copy())
            if out.returncode != 0:
                sys.exit(f"{variant} worker failed:\n{out.stderr[-3000:]}")
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  round {r + 1}/{args.rounds} {variant}: {runs[variant][-1]['tokens_per_s']:.0f} tokens/s",
                  file=sys.stderr)
    med = {}
    for v, rs in runs.items():
        m = {k: statistics.median(r[k] for r in rs) for k in ("step_s", "tokens_per_s", "gflops", "peak_rss_mb",
                                                            "matmul_peak_gflops", "fraction_of_peak", "compile_s",
                                                            "executed_gflops", "executed_fraction_of_peak")}
        med[v] = {**m, "params": rs[0]["params"], "rounds": [r["tokens_per_s"] for r in rs]}
    return {**med, "ratio_live": med["ours_live"]["tokens_per_s"] / med["torch"]["tokens_per_s"],
            "ratio_cached": med["ours_cached"]["tokens_per_s"] / med["torch"]["tokens_per_s"],
            "fraction_of_peak": med["ours_live"]["fraction_of_peak"],
            "executed_fraction_of_peak": med["ours_live"]["executed_fraction_of_peak"],
            "rss_ratio_live": med["ours_live"]["peak_rss_mb"] / med["torch"]["peak_rss_mb"]}


def print_table(res: dict, args) -> None:
    name = args.config or args.preset
    print(f"{name}: {res['torch']['params'] / 1e6:.1f}M params, {args.dtype}, batch {args.batch}+{args.batch} x "
          f"{args.seq}, {args.rounds} rounds x {args.steps} steps, {os.cpu_count()} CPUs")
    print("(model GFLOP/s: 6N per trained token + 2N per reference token; executed: the LM head counted only on\n"
          " the rows it runs on, answer positions for ours, every position for torch)")
    print(f"{'variant':<12} {'tokens/s':>9} {'vs torch':>9} {'model GF/s':>10} {'of peak':>8} {'executed GF/s':>13} "
          f"{'of peak':>8} {'matmul peak':>12} {'peak RSS MB':>12} {'compile s':>10}")
    for v in VARIANTS:
        r = res[v]
        print(f"{v:<12} {r['tokens_per_s']:9.1f} {r['tokens_per_s'] / res['torch']['tokens_per_s']:8.2f}x "
              f"{r['gflops']:10.1f} {r['fraction_of_peak']:8.1%} {r['executed_gflops']:13.1f} "
              f"{r['executed_fraction_of_peak']:8.1%} {r['matmul_peak_gflops']:12.1f} "
              f"{r['peak_rss_mb']:12.0f} {r['compile_s']:10.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--config", type=Path, help="an HF config.json instead of a preset")
    ap.add_argument("--batch", type=int, default=4, help="forget (and retain) sequences per step")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--reference", choices=["cached", "live"], default="cached")
    ap.add_argument("--remat", choices=["none", "full", "dots"], default="none")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--vs-torch", action="store_true", help="ours (live, cached) and the PyTorch step, side by side")
    ap.add_argument("--rounds", type=int, default=3, help="with --vs-torch: alternating rounds")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON object (last line)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args)))
        return
    if args.vs_torch:
        res = vs_torch(args)
        print_table(res, args)
        if args.json:
            print(json.dumps(res))
        return
    variant = "ours_live" if args.reference == "live" else "ours_cached"
    r = run_worker(variant, args)
    name = args.config or args.preset
    print(f"{name}: {r['params'] / 1e6:.1f}M params, {args.dtype}, batch {args.batch}+{args.batch} x {args.seq}, "
          f"reference {args.reference}, remat {args.remat}, {jax.devices()[0].platform}")
    print(f"{'step s':>8} {'tokens/s':>10} {'GFLOP/s':>9} {'of peak':>8} {'peak RSS MB':>12} {'compile s':>10}")
    print(f"{r['step_s']:8.3f} {r['tokens_per_s']:10.1f} {r['gflops']:9.1f} {r['fraction_of_peak']:8.1%} "
          f"{r['peak_rss_mb']:12.0f} {r['compile_s']:10.1f}")
    if args.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
