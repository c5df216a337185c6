"""`npo-jax eval`: evaluate a model, or re-score an existing log, and write the report."""

from __future__ import annotations

from pathlib import Path

from npo_jax.errors import NpoJaxError
from npo_jax.eval.aggregate import aggregate, per_item_values, read_log, summary
from npo_jax.eval.report import format_table, plot_truth_ratios
from npo_jax.eval.suite import EVAL_FILES, write_outputs
from npo_jax.fs import check_output_dir
from npo_jax.mask_convention import check_retain_log, log_mask, mark_log, recorded_mask, resolve_eot_mask


def load_scorer(model_path, tokenizer_path=None, *, compute_dtype="float32", batch_size=16, max_new_tokens=200,
                eot_mask_quirk=None, fmt=None):
    """The JAX scorer (`npo_jax.eval.scoring.Scorer`) of an HF model folder or an npo-jax checkpoint;
    `fmt`: the chat format (system prompt, date string) the model was trained with; `eot_mask_quirk`:
    its attention-mask convention, None for the model's record (`npo_jax.mask_convention`)."""
    from npo_jax.data.tokenize import ChatFormat, load_tokenizer
    from npo_jax.dtypes import dtype
    from npo_jax.eval.lm import LoadedLM
    from npo_jax.eval.scoring import Scorer
    from npo_jax.model import abstract_model, split_params
    from npo_jax.model_io import load_model

    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise NpoJaxError(f"{model_path}: no config.json (expected an HF model folder or an npo-jax checkpoint)")
    eot_mask_quirk = resolve_eot_mask(eot_mask_quirk, model_path)
    tokenizer = load_tokenizer(tokenizer_path or model_path)
    loaded = load_model(model_path)
    graphdef, _ = split_params(abstract_model(loaded.config, compute_dtype=dtype(compute_dtype, "compute dtype")))
    lm = LoadedLM(graphdef, loaded.params, tokenizer, fmt=fmt or ChatFormat(), eot_mask_quirk=eot_mask_quirk)
    return Scorer(lm, batch_size=batch_size, max_new_tokens=max_new_tokens)


def check_numbers(args) -> None:
    """Flags a user types: sizes of at least 1 (a --limit of 0 would mean "all" further down)."""
    for flag in ("batch_size", "max_new_tokens", "limit"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise NpoJaxError(f"--{flag.replace('_', '-')} {value}: must be at least 1")


def apply_run_folder(args) -> None:
    """Fill MODEL, data and output settings from a training run's folder and resolved config:
    every data setting the run trained with (splits, chat format, and the mask its config.yaml
    names when the model has no record of its own: runs from before the record)."""
    from npo_jax.data.tokenize import ChatFormat
    from npo_jax.fs import cache_dir
    from npo_jax.run_config import load_run_config

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise NpoJaxError(f"--run {run}: not a training run folder (no config.yaml)")
    cfg = load_run_config(run / "config.yaml")
    args.model = args.model or str(run / "checkpoints")
    args.data_dir = args.data_dir or cfg.data.dir
    args.tfds_dir = args.tfds_dir or cfg.data.tfds_dir or str(cache_dir(cfg.cache_dir) / "tfds")
    args.forget_split = args.forget_split or cfg.data.forget_split
    if args.eot_mask_quirk is None and recorded_mask(args.model) is None:
        args.eot_mask_quirk = cfg.data.eot_mask_quirk
    args.fmt = ChatFormat(cfg.data.system_prompt, cfg.data.date_string)
    args.out = args.out or str(run / "eval")


def run_eval(args) -> dict:
    check_numbers(args)
    if getattr(args, "run", None):
        apply_run_folder(args)
    args.forget_split = args.forget_split or "forget10"
    if not args.out:
        raise NpoJaxError("eval: --out is required (or --run)")
    overwrite = getattr(args, "overwrite", False)
    check_output_dir(args.out, overwrite, EVAL_FILES)  # before any model is loaded; again when writing
    retain_log = read_log(args.retain_logs, "retain log") if args.retain_logs else None
    base_log = read_log(args.base_logs, "base log") if args.base_logs else None
    if args.from_log:
        log = read_log(args.from_log, "evaluation log")
        per_item = per_item_values(log)
        if not per_item:
            raise NpoJaxError(f"{args.from_log}: no per-item values (value_by_index) to re-score")
        quirk = log_mask(log)  # the convention the re-scored log was computed with
        check_retain_log(quirk, retain_log)
        eval_log = mark_log(aggregate(per_item, retain_log), quirk)
    else:
        if not args.model:
            raise NpoJaxError("eval: give a MODEL folder or --from-log")
        from npo_jax.eval.suite import Suite

        scorer = load_scorer(args.model, args.tokenizer, compute_dtype=args.compute_dtype,
                             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                             eot_mask_quirk=args.eot_mask_quirk, fmt=getattr(args, "fmt", None))
        suite = Suite(scorer, data_dir=args.data_dir, tfds_dir=args.tfds_dir, forget_split=args.forget_split,
                      holdout_split=args.holdout_split, limit=args.limit)
        eval_log = suite.run(retain_log)
    logs = {"model": eval_log, "retain": retain_log, "base": base_log}
    plot = {"truth_ratios.png": lambda p: plot_truth_ratios(p, logs)}
    write_outputs(args.out, eval_log, overwrite=overwrite,
                  extra_files=plot if "forget_truth_ratio" in eval_log else {})  # a partial --from-log has none
    summaries = {"model": summary(eval_log)}
    if base_log:
        summaries["base"] = summary(base_log)
    if retain_log:
        summaries["retain"] = summary(retain_log)
    print(format_table(summaries))
    print(f"wrote {Path(args.out) / 'TOFU_EVAL.json'}")
    return eval_log
