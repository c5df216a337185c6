"""Why the model folds activations to 2-D before each matmul: a stack of Llama MLPs, forward +
backward, with (batch, time, features) inputs against (tokens, features), and torch for scale.

    python scripts/bench_mlp_layout.py            # `small` shapes: 8 layers, 8 x 128 tokens, 512 -> 1408

With 3-d inputs each weight gradient contracts two axes (batch, time), which XLA:CPU emits as
transposing copies of the output gradient; with 2-d inputs it contracts one. Variants take turns,
medians reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def mlp_3d(w, h):
    return h + jnp.dot(jax.nn.silu(jnp.dot(h, w["gate"])) * jnp.dot(h, w["up"]), w["down"])


def mlp_2d(w, h):
    flat = h.reshape(-1, h.shape[-1])
    out = jnp.dot(jax.nn.silu(jnp.dot(flat, w["gate"])) * jnp.dot(flat, w["up"]), w["down"])
    return h + out.reshape(h.shape)


def jax_variant(mlp, weights, x):
    def loss(w, h):
        h, _ = jax.lax.scan(lambda c, layer: (mlp(layer, c), None), h, w)
        return jnp.sum(h * h)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda: jax.block_until_ready(grad(weights, x))


def torch_variant(weights, x):
    import torch

    ws = [{k: torch.from_numpy(np.array(v[i])).requires_grad_() for k, v in weights.items()}
          for i in range(weights["gate"].shape[0])]
    h0 = torch.from_numpy(np.array(x)).requires_grad_()

    def run():
        h = h0
        for w in ws:
            h = h + (torch.nn.functional.silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"]
        (h * h).sum().backward()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    L, d, f = args.layers, args.hidden, args.intermediate
    weights = {k: jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.02)
               for k, s in (("gate", (L, d, f)), ("up", (L, d, f)), ("down", (L, f, d)))}
    x = jnp.asarray(rng.standard_normal((args.batch, args.seq, d), dtype=np.float32))
    variants = {"jax, 3-d activations": jax_variant(mlp_3d, weights, x),
                "jax, 2-d activations": jax_variant(mlp_2d, weights, x),
                "torch (eager)": torch_variant(weights, x)}
    times = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # compile / warm up
    for _ in range(args.rounds):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    flops = 6 * 3 * args.batch * args.seq * d * f * L
    print(f"{L} MLPs, {args.batch} x {args.seq} tokens, {d} -> {f}, float32, forward + backward")
    for k, ts in times.items():
        m = statistics.median(ts)
        print(f"{k:<24} {m * 1e3:8.0f} ms {flops / m / 1e9:8.1f} GFLOP/s")


if __name__ == "__main__":
    main()
