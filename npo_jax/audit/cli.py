"""`npo-jax audit --models NAME=DIR ...`: every probe for every model, one report side by side.

Input is checked before any model is loaded: a malformed `--models` entry, a repeated name, a
missing folder or an unknown `--reference` is an error naming it. Models are loaded one at a time
(HF folders or Orbax checkpoints, as `npo-jax eval`); OUT gets AUDIT.json, AUDIT.md and
audit.png, all or nothing; an existing OUT is replaced only with --overwrite, and only if it
holds nothing but those files (a previous audit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from npo_jax.errors import NpoJaxError
from npo_jax.run_config import COMPUTE_DTYPES, check_range

AUDIT_FILES = ("AUDIT.json", "AUDIT.md", "audit.png")


def add_arguments(p) -> None:
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR",
                   help="models to audit: HF folders, Orbax params checkpoints or training checkpoints/ folders")
    p.add_argument("--out", required=True, help="output folder for AUDIT.json, AUDIT.md, audit.png")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds a previous audit (only)")
    p.add_argument("--data-dir", default=None, help="local TOFU folder (default: download locuslab/TOFU)")
    p.add_argument("--tfds-dir", default=None)
    p.add_argument("--forget-split", default="forget10", help="forget items: {split}_perturbed (default forget10)")
    p.add_argument("--retain-split", default="retain_perturbed", help="control items (default retain_perturbed)")
    p.add_argument("--reference", default=None, metavar="NAME", help="model of --models for the NLL shift, e.g. full")
    p.add_argument("--limit", type=int, default=None, help="only the first N items of each split")
    p.add_argument("--seed", type=int, default=0, help="sampling, clue choice, relearning split and bootstrap")
    p.add_argument("--n-samples", type=int, default=10, help="best-of-N samples per item (default 10)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, >= 0 (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, > 0 and <= 1")
    p.add_argument("--clue-turns", type=int, default=3, help="earlier QA turns in chain-of-clues (default 3)")
    p.add_argument("--qa-per-author", type=int, default=20, help="consecutive rows per author (TOFU: 20)")
    p.add_argument("--relearn-steps", type=int, default=0, help="relearning fine-tuning steps (default 0: skip)")
    p.add_argument("--relearn-lr", type=float, default=1e-5)
    p.add_argument("--relearn-batch", type=int, default=8)
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: each model folder)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--compute-dtype", default="float32", choices=COMPUTE_DTYPES)
    p.add_argument("--eot-mask-quirk", action=argparse.BooleanOptionalAction, default=None,
                   help="open-unlearning's attention mask for every model (or not: --no-eot-mask-quirk); "
                        "default: each model's record, open-unlearning's without one")


def parse_models(entries: list[str]) -> dict[str, Path]:
    models: dict[str, Path] = {}
    for entry in entries:
        name, sep, folder = entry.partition("=")
        name, folder = name.strip(), folder.strip()
        if not sep or not name or not folder:
            raise NpoJaxError(f"--models: cannot read {entry!r} (use NAME=DIR, e.g. full=models/tofu_full)")
        if name in models:
            raise NpoJaxError(f"--models: the name {name!r} is given twice")
        path = Path(folder)
        if not (path / "config.json").is_file():
            raise NpoJaxError(f"--models {name}: {path}: no model folder (no config.json; expected an HF folder or "
                              "an npo-jax checkpoint)")
        models[name] = path
    return models


def _split_names(args) -> dict[str, str]:
    return {"forget": f"{args.forget_split}_perturbed", "retain": args.retain_split}


def _check(args, models: dict) -> None:
    from npo_jax.data.tofu import SPLIT_FIELDS

    for key, name in _split_names(args).items():
        if name in SPLIT_FIELDS and "paraphrased_answer" not in SPLIT_FIELDS[name]:
            raise NpoJaxError(f"{key} split {name}: the probes need paraphrased and perturbed answers "
                              "(a *_perturbed split)")
    if args.reference is not None and args.reference not in models:
        raise NpoJaxError(f"--reference {args.reference!r} is not one of --models ({', '.join(models)})")
    for flag in ("n_samples", "qa_per_author", "bootstrap", "batch_size", "max_new_tokens", "relearn_batch"):
        if getattr(args, flag) < 1:
            raise NpoJaxError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.clue_turns < 0 or args.relearn_steps < 0 or (args.limit is not None and args.limit < 1):
        raise NpoJaxError("--clue-turns and --relearn-steps must be >= 0, --limit >= 1")
    for flag, lo, hi in (("temperature", 0, None), ("top_p", {0}, 1), ("relearn_lr", {0}, None), ("seed", 0, None)):
        check_range(f"--{flag.replace('_', '-')}", getattr(args, flag), lo, hi, prefix="")


def run_audit(args) -> dict:
    from npo_jax.audit.probes import ProbeConfig
    from npo_jax.audit.report import build_report, format_markdown, plot_rates
    from npo_jax.audit.run import AuditSplit, audit_model
    from npo_jax.data.tofu import load_split
    from npo_jax.eval.cli import load_scorer
    from npo_jax.fs import atomic_output_dir, check_output_dir

    models = parse_models(args.models)
    _check(args, models)
    check_output_dir(args.out, args.overwrite, AUDIT_FILES)  # before any model is loaded; again when writing
    splits = {}
    for key, name in _split_names(args).items():
        rows = list(load_split(name, args.data_dir, args.tfds_dir))
        if len(rows) % args.qa_per_author:
            raise NpoJaxError(f"{name}: {len(rows)} rows are not whole authors of --qa-per-author "
                              f"{args.qa_per_author} (chain-of-clues groups rows by author)")
        splits[key] = AuditSplit(name, rows, args.limit)
    cfg = ProbeConfig(n_samples=args.n_samples, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      clue_turns=args.clue_turns, qa_per_author=args.qa_per_author,
                      relearn_steps=args.relearn_steps, relearn_lr=args.relearn_lr, relearn_batch=args.relearn_batch)
    results, masks = {}, {}
    for name, path in models.items():
        print(f"auditing {name} ({path})", flush=True)
        scorer = load_scorer(path, args.tokenizer, compute_dtype=args.compute_dtype, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, eot_mask_quirk=args.eot_mask_quirk)
        masks[name] = scorer.eot_mask_quirk
        results[name] = audit_model(scorer, splits, cfg, n_resamples=args.bootstrap,
                                    log=lambda msg: print(msg, flush=True))
        del scorer
    config = {**dataclasses.asdict(cfg), "forget_split": splits["forget"].split, "retain_split": args.retain_split,
              "limit": args.limit, "bootstrap_resamples": args.bootstrap, "max_new_tokens": args.max_new_tokens,
              "batch_size": args.batch_size, "tokenizer": args.tokenizer,  # sampling seeds follow the batches
              "compute_dtype": args.compute_dtype, "eot_mask_quirk": masks}  # per model, as resolved
    report = build_report(results, {n: str(p) for n, p in models.items()}, config, reference=args.reference,
                          seed=args.seed, n_resamples=args.bootstrap)
    table = format_markdown(report)
    with atomic_output_dir(args.out, overwrite=args.overwrite, replaces=AUDIT_FILES) as tmp:
        (tmp / "AUDIT.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "AUDIT.md").write_text(f"# npo-jax audit\n\n{table}\n\nDefinitions: docs/audit.md; items and "
                                      "generations: AUDIT.json.\n")
        plot_rates(tmp / "audit.png", report)
    print(table)
    print(f"wrote {Path(args.out) / 'AUDIT.json'}")
    return report
