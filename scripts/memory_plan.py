"""Per-device memory of the Llama-3.2-3B (or 3.1-8B) NPO train step, compiled without weights, per mesh.

    python scripts/memory_plan.py                       # the seed's step: effective batch 32, 512 tokens
    python scripts/memory_plan.py --reference live --remat none --json
    python scripts/memory_plan.py --model 8b --meshes "one device" --lora-rank 16 --no-compile-ratio

With `--lora-rank R` the step is the LoRA step `npo-jax unlearn` builds with `lora.rank=R`
(`npo_jax.lora.LoraModel`): the trained params and AdamW state are the float32 adapters of
`--lora-targets`, the frozen base is the step's reference input in `--base-dtype` (bfloat16 as
`lora.base_dtype=bfloat16`), one copy serving both.

The step is lowered and compiled by XLA (here on simulated CPU devices) from abstract params
(ShapeDtypeStruct with the run's shardings), exactly as `npo-jax unlearn` builds it, and XLA's
memory analysis of the per-device program is printed: arguments (params, optimizer state,
batch, reference), outputs (the new state: donated, so it reuses the arguments' buffers) and
temporaries (activations, gradients, remat recomputation, collectives). It also compiles the
2-layer version of the same step, for the compile-time ratio (28 layers are one `lax.scan`).

CPU-compiled temporaries are an estimate of what the TPU/GPU compiler needs (the fusion and
scheduling differ, the sizes of params, state and activations do not).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npo_jax.config import LlamaConfig, read_config_dict  # noqa: E402
from npo_jax.lora import LoraModel, LoraSpec, adapter_shapes, adapter_shardings  # noqa: E402
from npo_jax.losses import Objective  # noqa: E402
from npo_jax.model import abstract_model, split_params  # noqa: E402
from npo_jax.optim import make_optimizer  # noqa: E402
from npo_jax.run_config import LORA_TARGETS  # noqa: E402
from npo_jax.sharding import make_mesh, param_shardings  # noqa: E402
from npo_jax.train_step import (  # noqa: E402
    batch_shardings,
    init_state,
    make_pmap_step,
    make_sharded_step,
    state_shardings,
)

GIB = 1024**3
# Llama-3.2-3B-Instruct's config.json (used when ../shared is absent)
LLAMA32_3B = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192,
    "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
}
# Llama-3.1-8B-Instruct's shape: the 3B's rope and vocabulary, hidden 4096, 32 layers, untied embeddings
LLAMA31_8B = {**LLAMA32_3B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False}
SHARED_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "llama3" / "Llama-3.2-3B-Instruct" / "config.json"
MESHES = {"one device": ("sharded", 1, 1), "fsdp=8": ("sharded", 1, 8), "data2 x fsdp4": ("sharded", 2, 4),
          "data=8 (pmap)": ("pmap", 8, 1)}
CHIPS = {"TPU v5e 16 GiB": 16, "TPU v4 32 GiB": 32, "A100 40 GiB": 40, "H100 80 GiB": 80, "H200 141 GiB": 141}


def abstract_batch(accum: int, rows: int, seq: int, cached: bool) -> dict:
    """The trainer's batch layout; label_positions at their widest (seq - 1: every position
    labelled, the LM head on all of them), so the plan holds for any answer length."""

    def group():
        ids = jax.ShapeDtypeStruct((accum, rows, seq), jnp.int32)
        positions = jax.ShapeDtypeStruct((accum, rows, seq - 1), jnp.int32)
        return {"input_ids": ids, "labels": ids, "attention_mask": ids, "label_positions": positions}

    batch = {"forget": group(), "retain": group()}
    if cached:
        batch["forget_ref_logp"] = jax.ShapeDtypeStruct((accum, rows), jnp.float32)
    return batch


def with_sharding(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def model_and_params(cfg: LlamaConfig, args):
    """(graphdef, trained params, frozen base or None) as abstract arrays: float32 master params,
    or with --lora-rank the float32 adapters over a base in --base-dtype."""
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    if not args.lora_rank:
        graphdef, params = split_params(abstract_model(cfg, compute_dtype=dtype, remat=args.remat))
        return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params), None
    spec = LoraSpec(args.lora_rank, 2.0 * args.lora_rank, 0.0, tuple(args.lora_targets))
    lora = LoraModel(cfg, spec, compute_dtype=dtype, remat=args.remat)
    _, base = split_params(abstract_model(cfg))
    base_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.base_dtype]
    base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, base_dtype), base)
    adapters: dict = {}
    for path, shape in adapter_shapes(cfg, spec).items():
        node = adapters
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.ShapeDtypeStruct(shape, jnp.float32)
    return lora, adapters, base


def compile_step(cfg: LlamaConfig, mesh_name: str, args):
    """The compiled per-device train step for one mesh, and its compile seconds."""
    strategy, data, fsdp = MESHES[mesh_name]
    graphdef, params, base = model_and_params(cfg, args)
    obj = Objective("NPO", beta=0.1, alpha=2.0, reference=args.reference)
    tx, schedule = make_optimizer(params, lr=2e-5, total_steps=60, warmup=12, weight_decay=0.01, max_grad_norm=1.0)
    units = data * fsdp
    accum = args.batch // (args.per_device_batch * units)
    cached = args.reference == "cached"
    live = not cached or base is not None  # LoRA: the base is always the step's (reference) input
    batch = abstract_batch(accum, args.per_device_batch * units, args.seq, cached)
    state = jax.eval_shape(lambda p: init_state(p, tx), params)
    t0 = time.perf_counter()
    if strategy == "sharded":
        mesh = make_mesh(data, fsdp, 1)
        p_shard = ref_shard = param_shardings(cfg, mesh)
        if base is not None:
            specs = jax.tree.map(lambda s: s.spec, ref_shard, is_leaf=lambda x: hasattr(x, "spec"))
            p_shard = adapter_shardings(specs, graphdef.spec, mesh)
        s_shard = state_shardings(tx, params, p_shard, mesh)
        ref = with_sharding(base if base is not None else params, ref_shard) if live else None
        step = make_sharded_step(graphdef, obj, tx, schedule, mesh, s_shard, units, ref_shard if live else None)
        lowered = step.lower(with_sharding(state, s_shard), ref,
                             with_sharding(batch, batch_shardings(batch, mesh)))
    else:
        def per_device(tree):
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct((data, *x.shape), x.dtype), tree)

        rows = args.per_device_batch
        local = abstract_batch(accum, rows, args.seq, cached)
        step = make_pmap_step(graphdef, obj, tx, schedule)
        ref = (base if base is not None else params) if live else None
        lowered = step.lower(per_device(state), per_device(ref) if live else None, per_device(local))
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t0


def cpu_weight_upcasts(compiled, cfg: LlamaConfig) -> float:
    """Bytes of float32 copies of whole bfloat16 weights in a CPU-compiled step. XLA:CPU runs bf16
    dots in float32: it converts each bf16 weight stack and hoists the convert out of the layer scan
    and the accumulation loop, so a full float32 copy of the weights sits in its temporaries. A
    GPU/TPU compiler runs the dots in bf16 and makes no such copy: the plan subtracts these bytes
    for its accelerator estimate (of a LoRA step over a bf16 base). Counted once per weight whose
    shape some convert to f32 outputs."""
    if jax.default_backend() != "cpu":
        return 0.0
    found = {tuple(int(d) for d in dims.split(",")) for dims in
             re.findall(r"= f32\[([\d,]+)\]\{[^}]*\} convert\(", compiled.as_text())}
    weights = [x for x in jax.tree.leaves(split_params(abstract_model(cfg))[1]) if x.ndim >= 2]
    return float(sum(x.size * 4 for x in weights if tuple(x.shape) in found))


def memory_row(compiled, cfg: LlamaConfig, bf16_weights: bool) -> dict:
    m = compiled.memory_analysis()
    args_b, out_b, alias_b, temp_b = (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                                      m.temp_size_in_bytes)
    upcast = cpu_weight_upcasts(compiled, cfg) if bf16_weights else 0.0  # float32 master params: none
    total = args_b + out_b - alias_b + temp_b
    return {"arguments_gib": args_b / GIB, "outputs_gib": out_b / GIB, "aliased_gib": alias_b / GIB,
            "temporaries_gib": temp_b / GIB, "total_gib": total / GIB, "cpu_weight_upcasts_gib": upcast / GIB,
            "accelerator_gib": (total - upcast) / GIB}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None,
                    help="HF config.json (default: --model's)")
    ap.add_argument("--model", choices=["3b", "8b"], default="3b",
                    help="Llama-3.2-3B-Instruct (../shared's config.json when there) or Llama-3.1-8B's shape")
    ap.add_argument("--lora-rank", type=int, default=0, help="the LoRA step with adapters of this rank (0: full)")
    ap.add_argument("--lora-targets", nargs="+", default=list(LORA_TARGETS), choices=LORA_TARGETS)
    ap.add_argument("--base-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="LoRA: the frozen base's dtype (lora.base_dtype)")
    ap.add_argument("--batch", type=int, default=32, help="effective batch (forget sequences per step)")
    ap.add_argument("--per-device-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="compute dtype")
    ap.add_argument("--remat", choices=["none", "full", "dots"], default="full")
    ap.add_argument("--reference", choices=["cached", "live"], default="cached")
    ap.add_argument("--meshes", nargs="*", default=list(MESHES)[1:], choices=list(MESHES),
                    help="default: the three 8-device meshes")
    ap.add_argument("--no-compile-ratio", action="store_true", help="skip the 2- vs 28-layer compile timing")
    ap.add_argument("--json", action="store_true")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.config is None and args.model == "3b" and SHARED_CONFIG.is_file():
        args.config = SHARED_CONFIG
    raw = read_config_dict(args.config) if args.config else {"3b": LLAMA32_3B, "8b": LLAMA31_8B}[args.model]
    cfg = LlamaConfig.from_hf_dict(raw, str(args.config or f"Llama-{args.model}"))
    n_params = sum(x.size for x in jax.tree.leaves(split_params(abstract_model(cfg))[1]))
    print(f"Llama {n_params / 1e9:.2f}B, NPO (reference {args.reference}), effective batch {args.batch} forget + "
          f"{args.batch} retain x {args.seq} tokens, per-device batch {args.per_device_batch}, remat {args.remat}, "
          f"{args.dtype} compute, " + (f"LoRA rank {args.lora_rank} ({', '.join(args.lora_targets)}): float32 "
                                       f"adapters + AdamW state, {args.base_dtype} base" if args.lora_rank else
                                       "float32 params + AdamW state"))
    rows, out = [], {}
    for name in args.meshes:
        compiled, secs = compile_step(cfg, name, args)
        row = memory_row(compiled, cfg, bool(args.lora_rank) and args.base_dtype == "bfloat16")
        row["compile_s"] = secs
        out[name] = row
        rows.append((name, row))
    print(f"\n{'mesh':<15} {'arguments':>10} {'outputs':>9} {'aliased':>9} {'temps':>8} {'total GiB':>10} "
          f"{'cpu f32 copies':>14} {'accelerator':>11}  " + "  ".join(f"{c:>14}" for c in CHIPS))
    for name, r in rows:
        fits = "  ".join(f"{'fits' if r['accelerator_gib'] <= gib * 0.95 else 'NO':>14}" for gib in CHIPS.values())
        print(f"{name:<15} {r['arguments_gib']:10.2f} {r['outputs_gib']:9.2f} {r['aliased_gib']:9.2f} "
              f"{r['temporaries_gib']:8.2f} {r['total_gib']:10.2f} {r['cpu_weight_upcasts_gib']:14.2f} "
              f"{r['accelerator_gib']:11.2f}  {fits}")
    print("\n('accelerator': the total less XLA:CPU's float32 copies of bf16 weights; 'fits': that within 95% of "
          "the chip's memory, leaving room for the runtime)")
    print("\nrecommended strategy per chip:")
    for chip, gib in CHIPS.items():
        ok = [n for n, r in rows if r["accelerator_gib"] <= gib * 0.95]
        # prefer the least sharding that fits: plain data parallel (pmap) > data x fsdp > fsdp
        order = ["one device", "data=8 (pmap)", "data2 x fsdp4", "fsdp=8"]
        pick = next((n for n in order if n in ok), None)
        print(f"  {chip:<16} {pick or 'none of these: raise fsdp, lower per_device_batch, or remat=full'}")
    if not args.no_compile_ratio:
        small = LlamaConfig.from_hf_dict({**raw, "num_hidden_layers": 2}, "2-layer")
        _, t2 = compile_step(small, "fsdp=8", args)
        _, t28 = compile_step(cfg, "fsdp=8", args)
        out["compile_s_2_layers"], out[f"compile_s_{cfg.num_hidden_layers}_layers"] = t2, t28
        print(f"\ncompile time, fsdp=8 step: 2 layers {t2:.1f} s, {cfg.num_hidden_layers} layers {t28:.1f} s "
              f"(ratio {t28 / t2:.2f}; the layers are one lax.scan)")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
