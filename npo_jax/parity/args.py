"""The arguments of `npo-jax parity` (no heavy imports: the CLI builds its parser from this)."""

from __future__ import annotations

import argparse


def add_arguments(p) -> None:
    p.add_argument("model", help="HF model folder, npo-jax params/training checkpoint, or training run folder")
    p.add_argument("--config", default=None, help="run config (YAML) for the objective, mask convention and data "
                                                 "(default: the run's config.yaml, else the seed's NPO recipe)")
    p.add_argument("--eot-mask-quirk", action=argparse.BooleanOptionalAction, default=None,
                   help="open-unlearning's attention mask, every <|eot_id|> hidden (or not: --no-eot-mask-quirk); "
                        "default: the config's data.eot_mask_quirk, else the model's record, else open-unlearning's")
    p.add_argument("--data-dir", default=None, help="local TOFU folder (default: the config's data.dir, else "
                                                   "download locuslab/TOFU)")
    p.add_argument("--tfds-dir", default=None, help="where TFDS prepares the splits (default: cache_dir/tfds)")
    p.add_argument("--items", type=int, default=4, help="TOFU items per check (default 4)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="greedy tokens per answer (default 200, as eval)")
    p.add_argument("--tmp-dir", default=None, help="where the round trip's temporary folders go (the 3B in bf16: "
                                                  "about 13 GB; default: the system's temporary folder)")
    p.add_argument("--out", default=None, help="output folder for parity.json and parity.txt (default: "
                                              "RUN/parity for a run folder, else ./parity)")
