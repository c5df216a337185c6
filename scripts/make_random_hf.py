"""Save a randomly initialised `transformers.LlamaForCausalLM` in one of `bench_step.py`'s shapes,
with the tokenizer files and special-token ids of an existing HF folder: the model that the
evaluation benchmark (`eval_parity.py --bench`) runs at a realistic size, offline.

    python scripts/make_random_hf.py runs/small_hf --like runs/demo/unlearned/hf --preset small
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_step import PRESETS  # noqa: E402

from npo_jax.fs import atomic_output_dir  # noqa: E402

KEEP = ("bos_token_id", "eos_token_id", "pad_token_id", "rms_norm_eps", "torch_dtype", "dtype")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--like", type=Path, required=True, help="HF folder whose tokenizer and special ids are kept")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    import transformers

    like = json.loads((args.like / "config.json").read_text())
    cfg = {k: like[k] for k in KEEP if k in like} | PRESETS[args.preset]
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with atomic_output_dir(args.out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (args.like / name).is_file():
                shutil.copy(args.like / name, tmp / name)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {args.preset}, {n / 1e6:.1f}M params, random (seed {args.seed}), tokenizer of {args.like}")


if __name__ == "__main__":
    main()
