"""Benchmark our NPO train step: tokens/s, model GFLOP/s and peak resident memory.

    python scripts/bench_step.py --preset small --batch 4 --seq 128
    python scripts/bench_step.py --config path/to/config.json --dtype bfloat16 --reference live

One optimizer step = forward + backward over `batch` forget and `batch` retain sequences of
`seq` tokens (random ids, the first half of each sequence masked as the prompt), AdamW update.
FLOPs count 6 N per trained token plus 2 N per reference-forward token (live reference), N =
parameter count. Warm-up (compile) is excluded; the median of `--steps` steps is reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npo_jax.config import LlamaConfig, read_config_dict  # noqa: E402
from npo_jax.losses import Objective  # noqa: E402
from npo_jax.model import LlamaForCausalLM, split_params  # noqa: E402
from npo_jax.optim import make_optimizer  # noqa: E402
from npo_jax.sharding import make_mesh, param_shardings  # noqa: E402
from npo_jax.train_step import batch_shardings, init_state, make_sharded_step  # noqa: E402

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
        return {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids)}

    return {"forget": group(), "retain": group(), "forget_ref_logp": rng.normal(-50, 5, batch).astype(np.float32)}


def bench_ours(cfg: LlamaConfig, *, batch: int, seq: int, dtype: str, reference: str, remat: str, steps: int) -> dict:
    compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    graphdef, params = build(cfg, compute, remat)
    mesh = make_mesh(1, 1, 1)
    shardings = param_shardings(cfg, mesh)
    params = jax.device_put(params, shardings)
    obj = Objective("NPO", beta=0.1, alpha=2.0, reference=reference)
    tx, schedule = make_optimizer(params, lr=1e-5, total_steps=1000, warmup=0, weight_decay=0.01, max_grad_norm=1.0)
    state = jax.jit(lambda p: init_state(p, tx))(params)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    ref = jax.tree.map(jnp.copy, params) if obj.needs_live_reference else None
    step = make_sharded_step(graphdef, obj, tx, schedule, mesh, state_shardings, units=1,
                             ref_shardings=shardings if ref is not None else None)
    host = jax.tree.map(lambda x: x[None], random_batch(cfg, batch, seq))
    if reference == "live":
        host.pop("forget_ref_logp")
    dev = jax.device_put(host, batch_shardings(host, mesh))
    t0 = time.perf_counter()
    state, metrics = step(state, ref, dev)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, ref, dev)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    trained = 2 * batch * seq
    ref_tokens = batch * seq if reference == "live" else 0
    dt = statistics.median(times)
    return {
        "params": n_params, "tokens_per_step": trained, "step_s": dt, "compile_s": compile_s,
        "tokens_per_s": trained / dt, "gflops": (6 * n_params * trained + 2 * n_params * ref_tokens) / dt / 1e9,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loss": float(metrics["loss"]),
    }


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
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args()
    raw = read_config_dict(args.config) if args.config else {"model_type": "llama", **PRESETS[args.preset]}
    cfg = LlamaConfig.from_hf_dict(raw, str(args.config or args.preset))
    r = bench_ours(cfg, batch=args.batch, seq=args.seq, dtype=args.dtype, reference=args.reference,
                   remat=args.remat, steps=args.steps)
    name = args.config or args.preset
    print(f"{name}: {r['params'] / 1e6:.1f}M params, {args.dtype}, batch {args.batch}+{args.batch} x {args.seq}, "
          f"reference {args.reference}, remat {args.remat}, {jax.devices()[0].platform}")
    print(f"{'step s':>8} {'tokens/s':>10} {'GFLOP/s':>9} {'peak RSS MB':>12} {'compile s':>10}")
    print(f"{r['step_s']:8.3f} {r['tokens_per_s']:10.1f} {r['gflops']:9.1f} {r['peak_rss_mb']:12.0f} "
          f"{r['compile_s']:10.1f}")
    if args.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
