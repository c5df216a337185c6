"""Benchmark HF -> Orbax -> HF conversion: wall time, MB/s and peak resident memory per direction.

    python scripts/bench_convert.py                      # real Llama-3.2-3B config, bf16, 2 shards
    python scripts/bench_convert.py --config path/to/config.json --work /tmp/bench --keep

A random HF checkpoint in the given config is written first (streamed, tensor by tensor), then
each direction runs in a fresh subprocess so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convert.orbax_to_hf import _plan_shards, parse_size  # noqa: E402
from convert.safetensors_writer import SafetensorsWriter  # noqa: E402
from npo_jax.config import LlamaConfig, read_config_dict, with_dtype  # noqa: E402
from npo_jax.dtypes import dtype as np_dtype  # noqa: E402
from npo_jax.params import hf_tensor_shapes  # noqa: E402
from npo_jax.safetensors_io import INDEX_NAME  # noqa: E402

DEFAULT_CONFIG = ROOT.parent / "shared" / "llama3" / "Llama-3.2-3B-Instruct" / "config.json"


def make_random_hf(config_path: Path, out: Path, dtype: str, shard_size: str) -> int:
    """Write random weights for `config_path` as a sharded HF folder; return total bytes."""
    raw = read_config_dict(config_path)
    cfg = LlamaConfig.from_hf_dict(raw, str(config_path))
    target = np_dtype(dtype)
    entries = [(name, target, shape) for name, shape in hf_tensor_shapes(cfg).items()]
    shards = _plan_shards(entries, parse_size(shard_size))
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = SafetensorsWriter(out / name, shard)
        for tensor_name, dt, shape in shard:
            t = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dt)
            writer.write(tensor_name, t)
            weight_map[tensor_name] = name
            total += t.nbytes
        writer.close()
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(with_dtype(raw, dtype), indent=2))
    return total


def _child(direction: str, src: str, dst: str, dtype: str) -> None:
    from convert import hf_to_orbax, orbax_to_hf

    start = time.perf_counter()
    if direction == "hf-to-orbax":
        hf_to_orbax(src, dst, dtype=dtype, progress=False)
    else:
        orbax_to_hf(src, dst, dtype=dtype, progress=False)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": elapsed, "peak_rss": peak}))


def _run(direction, src, dst, dtype) -> dict:
    cmd = [sys.executable, __file__, "--child", direction, str(src), str(dst), dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--hf-dtype", default="bfloat16", help="dtype of the random HF checkpoint")
    ap.add_argument("--params-dtype", default="float32", help="dtype of the Orbax params")
    ap.add_argument("--shard-size", default="5GB")
    ap.add_argument("--work", type=Path, default=Path("/tmp/npo_jax_bench_convert"))
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    if not args.config.is_file():
        sys.exit(f"{args.config}: config not found (pass --config)")
    shutil.rmtree(args.work, ignore_errors=True)
    hf, ckpt, out = args.work / "hf", args.work / "orbax", args.work / "hf_out"

    t0 = time.perf_counter()
    hf_bytes = make_random_hf(args.config, hf, args.hf_dtype, args.shard_size)
    print(f"random HF checkpoint: {hf_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s "
          f"({len(list(hf.glob('*.safetensors')))} shards)")
    n_params = hf_bytes // np.dtype(np_dtype(args.hf_dtype)).itemsize
    params_bytes = n_params * np.dtype(np_dtype(args.params_dtype)).itemsize

    rows = []
    a = _run("hf-to-orbax", hf, ckpt, args.params_dtype)
    rows.append(("hf -> orbax", a, hf_bytes, max(hf_bytes, params_bytes)))
    b = _run("orbax-to-hf", ckpt, out, args.hf_dtype)
    rows.append(("orbax -> hf", b, hf_bytes, max(hf_bytes, params_bytes)))

    print(f"\nparams: {n_params:,}  HF {args.hf_dtype}: {hf_bytes / 2**30:.2f} GiB  "
          f"Orbax {args.params_dtype}: {params_bytes / 2**30:.2f} GiB (on disk {_dir_bytes(ckpt) / 2**30:.2f} GiB)")
    print(f"{'direction':<12} {'wall s':>8} {'MB/s':>8} {'peak RSS GiB':>13} {'largest copy GiB':>17} {'ratio':>6}")
    for name, r, moved, largest in rows:
        print(f"{name:<12} {r['seconds']:8.1f} {moved / 1e6 / r['seconds']:8.1f} {r['peak_rss'] / 2**30:13.2f} "
              f"{largest / 2**30:17.2f} {r['peak_rss'] / largest:6.2f}")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
