"""`npo-jax parity` on random weights in the real Llama-3.2-3B shape, stored in bfloat16 like the
release: does the command run on this host, how long does each part take, and how much memory.

    python scripts/bench_parity.py     # config and tokenizer: ../shared/llama3/Llama-3.2-3B-Instruct
    python scripts/bench_parity.py --like TOKENIZER_DIR --items 4 --max-new-tokens 16 --out runs/bench_parity

The weights are written tensor by tensor straight into safetensors (one tensor in memory at a
time; no torch model is built), then `npo-jax parity` runs as a process of its own (its peak RSS
is the command's alone) on them, with the TOFU data of ../shared/tofu when present, else a
synthetic TOFU. Prints the command's table, the time per part and the peak RSS. Random weights
have near-flat logits, whose argmax bfloat16 rounding flips; the bfloat16 check is expected to
fail on them (it passes on trained models), the others to pass.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convert.safetensors_writer import SafetensorsWriter  # noqa: E402
from npo_jax.config import LlamaConfig  # noqa: E402
from npo_jax.params import param_specs  # noqa: E402

SHARED = ROOT.parent / "shared"
LLAMA_3B = SHARED / "llama3" / "Llama-3.2-3B-Instruct"
# Llama-3.2-3B-Instruct's config.json, for hosts without ../shared
CONFIG_3B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 24, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


def random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
    """bf16 N(0, std) (norm weights: 1 + N(0, std)), drawn a block of rows at a time."""
    out = np.empty(shape, ml_dtypes.bfloat16)
    rows = out.reshape(shape[0], -1)
    step = max(1, (1 << 24) // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        block = rng.standard_normal((min(step, rows.shape[0] - start), rows.shape[1]), np.float32) * std
        if name.endswith("norm.weight"):
            block += 1.0
        rows[start:start + step] = block.astype(ml_dtypes.bfloat16)
    return out


def write_model(folder: Path, raw: dict, tokenizer_dir: Path, seed: int = 0) -> int:
    """A random bf16 HF folder in `raw`'s shape with `tokenizer_dir`'s tokenizer; returns the parameter count."""
    folder.mkdir(parents=True)
    cfg = LlamaConfig.from_hf_dict(raw, source="config")
    entries = [(name, np.dtype(ml_dtypes.bfloat16), spec.hf_shape) for spec in param_specs(cfg)
               for name in spec.hf_names(cfg.num_hidden_layers)]
    rng = np.random.default_rng(seed)
    writer = SafetensorsWriter(folder / "model.safetensors", entries)
    count = 0
    for name, _, shape in entries:
        writer.write(name, random_tensor(rng, name, shape, raw.get("initializer_range", 0.02)))
        count += int(np.prod(shape))
    writer.close()
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, folder / name)
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_parity"), help="work folder (replaced)")
    ap.add_argument("--like", type=Path, default=None, help="tokenizer folder (default: ../shared's 3B folder)")
    ap.add_argument("--data-dir", type=Path, default=None, help="TOFU folder (default: ../shared/tofu, else synthetic)")
    ap.add_argument("--items", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the 3B's 28 (a quick try)")
    args = ap.parse_args()

    raw = json.loads((LLAMA_3B / "config.json").read_text()) if (LLAMA_3B / "config.json").is_file() else CONFIG_3B
    if args.layers:
        raw = {**raw, "num_hidden_layers": args.layers}
    tokenizer_dir = args.like or LLAMA_3B
    if not (tokenizer_dir / "tokenizer.json").is_file():
        ap.error(f"no tokenizer in {tokenizer_dir}: pass --like with a Llama-3 tokenizer folder")
    if args.out.exists():
        shutil.rmtree(args.out)
    t0 = time.perf_counter()
    n = write_model(args.out / "model", raw, tokenizer_dir)
    print(f"random bf16 model: {n:,} parameters in {time.perf_counter() - t0:.0f} s", flush=True)
    data = args.data_dir or (SHARED / "tofu" if (SHARED / "tofu" / "forget10_perturbed.jsonl").is_file() else None)
    if data is None:
        from npo_jax.synthetic import make_synthetic_tofu

        data = make_synthetic_tofu(args.out / "tofu")
    (args.out / "tmp").mkdir()
    cmd = [sys.executable, "-m", "npo_jax.cli", "parity", str(args.out / "model"), "--data-dir", str(data),
           "--tfds-dir", str(args.out / "tfds"), "--items", str(args.items), "--max-new-tokens",
           str(args.max_new_tokens), "--batch-size", str(args.batch_size), "--tmp-dir", str(args.out / "tmp"),
           "--out", str(args.out / "parity")]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if not (args.out / "parity" / "parity.json").is_file():  # e.g. -9: killed by the kernel's OOM killer
        sys.exit(f"npo-jax parity ended with exit code {code} after {time.perf_counter() - t0:.0f} s, before its "
                 f"report; the parts it finished are above")
    report = json.loads((args.out / "parity" / "parity.json").read_text())
    print(f"\nexit code {code}; wall {time.perf_counter() - t0:.0f} s; peak RSS {report['peak_rss_gib_total']:.2f} GiB")
    for part, seconds in report["seconds"].items():
        print(f"  {part:<22} {seconds:8.1f} s   peak RSS so far {report['peak_rss_gib'][part]:6.2f} GiB   "
              f"RSS after {report['rss_gib'][part]:6.2f} GiB")


if __name__ == "__main__":
    main()
