"""The `npo-jax` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from npo_jax.errors import NpoJaxError, Preempted
from npo_jax.run_config import COMPUTE_DTYPES


def _convert_parser(sub) -> None:
    conv = sub.add_parser("convert", help="convert between HF safetensors and Orbax checkpoints")
    kinds = conv.add_subparsers(dest="direction", required=True)
    h2o = kinds.add_parser("hf-to-orbax", help="HF model folder -> Orbax params checkpoint")
    h2o.add_argument("src", help="HF model folder (config.json, model.safetensors[.index.json])")
    h2o.add_argument("dst", help="output checkpoint folder (must not exist unless --overwrite)")
    h2o.add_argument("--dtype", default="float32", help="params dtype: float32 (default), bfloat16, float16")
    h2o.add_argument("--mesh", default=None, metavar="AXES",
                     help="place params on a device mesh while converting, e.g. fsdp=8 or data=2,fsdp=4")
    h2o.add_argument("--overwrite", action="store_true")
    o2h = kinds.add_parser("orbax-to-hf", help="Orbax params or training checkpoint -> HF model folder")
    o2h.add_argument("src", help="params checkpoint (from hf-to-orbax) or training checkpoint folder")
    o2h.add_argument("dst", help="output HF folder (must not exist unless --overwrite)")
    o2h.add_argument("--dtype", default=None, help="weights dtype (default: the source model's, else bfloat16)")
    o2h.add_argument("--tokenizer-from", default=None, help="folder to copy tokenizer files from")
    o2h.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    o2h.add_argument("--overwrite", action="store_true")
    o2h.add_argument("--adapter", action="store_true",
                     help="LoRA run: write a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) "
                          "instead of the base model with the adapters merged in")
    o2h.add_argument("--base", default=None, help="LoRA run: the base model folder (default: the recorded path)")


def parse_mesh(text: str):
    """'data=2,fsdp=4' -> a ("data", "fsdp", "tensor") Mesh over all devices."""
    from npo_jax.sharding import MESH_AXES, make_mesh

    sizes = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in MESH_AXES or not value.strip().isdigit():
            raise NpoJaxError(f"--mesh: cannot read {part!r} (use e.g. fsdp=8 or data=2,fsdp=2,tensor=2)")
        sizes[name.strip()] = int(value)
    try:
        return make_mesh(**sizes)
    except ValueError as e:
        raise NpoJaxError(f"--mesh {text}: {e}") from None


def _train_parsers(sub) -> None:
    for name, what in (("unlearn", "unlearn a model on TOFU (NPO, SimNPO, GradDiff, GradAscent)"),
                       ("finetune", "fine-tune (SFT) a model on a TOFU split")):
        p = sub.add_parser(name, help=what)
        p.add_argument("config", help="YAML run config (see configs/)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5 output_dir=runs/x "
                                                   "(anywhere on the line)")
        p.add_argument("--resume", action="store_true", help="continue the run in output_dir")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
        p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="TOFU evaluation (open-unlearning's metrics and log layout)")
    p.add_argument("model", nargs="?", help="HF model folder or Orbax checkpoint (omit with --from-log)")
    p.add_argument("--from-log", default=None, help="re-score an existing TOFU_EVAL.json without a model")
    p.add_argument("--run", default=None, help="a training run folder: its final checkpoint, data settings and "
                                               "tokenizer (output default: RUN/eval)")
    p.add_argument("--retain-logs", default=None, help="retain model's TOFU_EVAL.json (for forget_quality)")
    p.add_argument("--base-logs", default=None, help="starting model's TOFU_EVAL.json (plotted beside)")
    p.add_argument("--forget-split", default=None, help="default: the run's (with --run), else forget10")
    p.add_argument("--holdout-split", default=None, help="e.g. holdout10, for mia_min_k and privleak")
    p.add_argument("--data-dir", default=None, help="local TOFU folder (default: download locuslab/TOFU)")
    p.add_argument("--tfds-dir", default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--compute-dtype", default="float32", choices=COMPUTE_DTYPES)
    p.add_argument("--eot-mask-quirk", action=argparse.BooleanOptionalAction, default=None,
                   help="open-unlearning's attention mask, which also hides every <|eot_id|> (or not: "
                        "--no-eot-mask-quirk); default: the model's record, open-unlearning's without one")
    p.add_argument("--limit", type=int, default=None, help="only the first N items of each split")
    p.add_argument("--out", default=None, help="output folder for TOFU_EVAL.json, TOFU_SUMMARY.json, report")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds a previous evaluation (and nothing else)")


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="offline end-to-end TOFU unlearning demo on a CPU (a few minutes)")
    p.add_argument("out", help="output folder (new)")
    p.add_argument("--config", default=None, help="demo config (default: configs/demo.yaml of this package)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. unlearn.lr=2e-3")


def _sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="unlearning runs (methods x a grid), evaluated and ranked by forget_quality")
    p.add_argument("config", help="sweep config (see configs/sweep/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the sweep config, e.g. output_dir=runs/s "
                                               "eval.retain_logs=path/TOFU_EVAL.json")
    p.add_argument("--max-runs", type=int, default=None, help="stop after training this many runs")


def _audit_parser(sub) -> None:
    from npo_jax.audit.cli import add_arguments

    add_arguments(sub.add_parser("audit", help="leak probes beyond the TOFU metrics, several models side by side"))


def _parity_parser(sub) -> None:
    from npo_jax.parity.args import add_arguments

    add_arguments(sub.add_parser("parity", help="check JAX against transformers on your model (round trip, logits, "
                                                "generation, objective, evaluation)"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npo-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _convert_parser(sub)
    _train_parsers(sub)
    _eval_parser(sub)
    _demo_parser(sub)
    _sweep_parser(sub)
    _audit_parser(sub)
    _parity_parser(sub)
    parser.commands = sub.choices  # name -> subparser, for parse_args
    return parser


# commands with dotted overrides: parsed intermixed, so an override may follow a flag
# (`unlearn CFG --resume optim.lr=1e-5`); plain parse_args stops taking positionals at the first flag
_OVERRIDE_COMMANDS = ("unlearn", "finetune", "sweep", "demo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and argv[0] in _OVERRIDE_COMMANDS:
        args = parser.commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def _run(args) -> int | None:
    if args.command in ("sweep", "unlearn", "finetune"):
        from npo_jax.memory import reuse_host_memory

        reuse_host_memory()  # training on XLA:CPU; before jax's first computation starts its threads
    if args.command == "demo":
        from npo_jax.demo import run_demo

        result = run_demo(args.out, args.config, args.overrides)
        if not all(result["checks"].values()):
            raise NpoJaxError("demo: the unlearning checks above failed")
    elif args.command == "sweep":
        from npo_jax.sweep import run_sweep

        run_sweep(args.config, args.overrides, max_runs=args.max_runs)
    elif args.command == "eval":
        from npo_jax.eval.cli import run_eval

        run_eval(args)
    elif args.command == "audit":
        from npo_jax.audit.cli import run_audit

        run_audit(args)
    elif args.command == "parity":  # exit code 1 when a check fails
        from npo_jax.parity_run import run_parity

        return run_parity(args)
    elif args.command in ("unlearn", "finetune"):
        from npo_jax.fs import check_output_path
        from npo_jax.run_config import load_run_config
        from npo_jax.train import Trainer

        cfg = load_run_config(args.config, args.overrides)
        check_output_path(cfg.output_dir)
        trainer = Trainer(cfg, args.command, resume=args.resume, overwrite=args.overwrite, max_steps=args.max_steps)
        info = trainer.train()
        print(f"done: {info['steps']} steps in {cfg.output_dir}")
    elif args.command == "convert":
        from convert import hf_to_orbax, orbax_to_hf

        if args.direction == "hf-to-orbax":
            mesh = parse_mesh(args.mesh) if args.mesh else None
            out = hf_to_orbax(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, mesh=mesh)
        elif args.adapter:
            from convert.lora_export import adapter_to_peft

            out = adapter_to_peft(args.src, args.dst, overwrite=args.overwrite)
        elif args.base:
            from convert.lora_export import merged_to_hf

            out = merged_to_hf(args.src, args.dst, args.dtype, args.tokenizer_from, args.max_shard_size,
                               args.overwrite, base=args.base)
        else:
            out = orbax_to_hf(args.src, args.dst, dtype=args.dtype, tokenizer_from=args.tokenizer_from,
                              max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        print(f"wrote {out}")


class _DropAbslNoise(logging.Filter):
    """Orbax logs 'Metadata file does not exist' (a warning) for every params checkpoint that
    `convert hf-to-orbax` wrote: a normal state, not something a user can or should act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Metadata file does not exist")


def quiet_absl_warnings() -> None:
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropAbslNoise) for f in logger.filters):
        logger.addFilter(_DropAbslNoise())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_absl_warnings()
    try:
        code = _run(args)
    except NpoJaxError as e:
        print(f"npo-jax: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:  # checkpoint written: the job can be requeued with --resume
        print(f"npo-jax: preempted: {e}", file=sys.stderr)
        return Preempted.exit_code
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
