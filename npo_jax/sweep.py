"""`npo-jax sweep CONFIG`: a grid of unlearning runs, each trained, evaluated (and exported on
request), ranked by forget_quality with model_utility beside it, as the seed run was chosen.

The runs are `methods` x `grid`: `methods` maps a label to that method's own run-config overrides
(method.name is the label unless they set it; `{}` runs the method at its defaults), so methods
are compared each with its own hyperparameters; `grid` maps dotted run-config keys to value lists
(every combination). Either may be left out.

Sweep folder layout:
    sweep.yaml                 the resolved sweep config
    runs/NAME/                 one training run folder per grid point (see npo_jax.train), plus
        eval/                  its TOFU_EVAL.json and TOFU_SUMMARY.json
        sweep_result.json      written last: the run is finished (a restart skips it)
    leaderboard.csv / .md      all finished runs, best forget_quality first
    leaderboard.png            forget_quality (log scale) against model_utility

Resumable: a restart skips finished runs and continues an interrupted one from its last
checkpoint. Every file is written to a temporary path and renamed into place.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import MISSING, OmegaConf

from npo_jax.errors import NpoJaxError
from npo_jax.fs import atomic_write, atomic_write_text, cache_dir, check_output_path
from npo_jax.run_config import COMPUTE_DTYPES

RESULT_FILE = "sweep_result.json"
BOARD_KEYS = ("forget_quality", "model_utility", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio",
              "retain_Q_A_Prob", "retain_Q_A_ROUGE", "privleak")


@dataclass
class SweepEval:
    retain_logs: str = MISSING  # the retain model's TOFU_EVAL.json: forget_quality compares against it
    holdout_split: str | None = "holdout10"
    batch_size: int = 16
    max_new_tokens: int = 200
    compute_dtype: Literal[COMPUTE_DTYPES] = "bfloat16"
    limit: int | None = None  # only the first N items of each split (quick looks, tests)


@dataclass
class SweepConfig:
    run_config: str | None = MISSING  # the run config every run starts from (null: the schema, + overrides)
    output_dir: str = MISSING
    # label -> {dotted run-config key: value} for that method's runs; method.name: the label unless set
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # dotted run-config key -> values
    overrides: list[str] = field(default_factory=list)  # dotted overrides for every run
    export_hf: bool = False  # export each run's final params as an HF folder
    eval: SweepEval = field(default_factory=SweepEval)


def load_sweep_config(path: str | Path, overrides=()) -> SweepConfig:
    if not Path(path).is_file():
        raise NpoJaxError(f"{path}: sweep config not found")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepConfig), OmegaConf.load(path),
                                 OmegaConf.from_dotlist(list(overrides)))
        cfg: SweepConfig = OmegaConf.to_object(merged)
    except Exception as e:  # omegaconf's missing/unknown key, type and choice errors, YAML errors
        key = getattr(e, "full_key", None)
        raise NpoJaxError(f"sweep config {path}: {f'{key}: ' if key else ''}{str(e).splitlines()[0]}") from None
    for name in ("batch_size", "max_new_tokens", "limit"):
        value = getattr(cfg.eval, name)
        if value is not None and value < 1:
            raise NpoJaxError(f"sweep config {path}: eval.{name}={value} is out of range: it must be >= 1")
    check_output_path(cfg.output_dir)
    if not (cfg.grid or cfg.methods) or any(not isinstance(v, list) or not v for v in cfg.grid.values()):
        raise NpoJaxError(f"sweep config {path}: grid must map dotted run-config keys to non-empty lists "
                          "(or methods name the methods to run)")
    return cfg


def _value_text(v) -> str:
    if v is None:
        return "null"
    return f"{v:g}" if isinstance(v, float) else str(v)


def grid_points(grid: dict[str, list]) -> list[tuple[str, dict]]:
    """(name, {key: value}) for every combination, in the grid's order; names say the values."""
    short = {k: k.rsplit(".", 1)[-1] for k in grid}
    if len(set(short.values())) < len(short):
        short = {k: k.replace(".", "_") for k in grid}
    points = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values, strict=True))
        points.append(("-".join(f"{short[k]}{_value_text(v)}" for k, v in point.items()), point))
    return points


def sweep_points(sweep: SweepConfig) -> list[tuple[str, dict]]:
    """(name, {key: value}) for every method x grid point: the label, then the grid values."""
    grid = grid_points(sweep.grid)
    if not sweep.methods:
        return grid
    points = []
    for label, settings in sweep.methods.items():
        base = {"method.name": label, **settings}
        points += [(f"{label}-{name}" if name else label, {**base, **point}) for name, point in grid]
    return points


def run_sweep(config: str | Path, overrides=(), *, max_runs: int | None = None, progress: bool = True) -> list[dict]:
    """Train and evaluate every unfinished grid point, updating the leaderboard after each."""
    from npo_jax.eval.aggregate import read_log
    from npo_jax.mask_convention import check_retain_log, resolve_eot_mask
    from npo_jax.run_config import load_run_config

    sweep = load_sweep_config(config, overrides)
    out = Path(sweep.output_dir)
    retain_log = read_log(sweep.eval.retain_logs, "retain log (eval.retain_logs)")
    points = sweep_points(sweep)
    masks = set()
    for name, point in points:  # every point's config is valid before anything runs
        cfg = load_run_config(sweep.run_config, _run_overrides(sweep, point, out / "runs" / name))
        masks.add(resolve_eot_mask(cfg.data.eot_mask_quirk, cfg.model.path, say=None))
    for quirk in sorted(masks):  # a retain log of another convention: said before the runs, not after
        check_retain_log(quirk, retain_log)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.yaml", OmegaConf.to_yaml(OmegaConf.structured(sweep)))
    done = 0
    for i, (name, point) in enumerate(points, 1):
        run_dir = out / "runs" / name
        if (run_dir / RESULT_FILE).is_file():
            print(f"[{i}/{len(points)}] {name}: finished earlier, skipped")
            continue
        if max_runs is not None and done >= max_runs:
            break
        print(f"[{i}/{len(points)}] {name}")
        cfg = load_run_config(sweep.run_config, _run_overrides(sweep, point, run_dir))
        result = _train_and_evaluate(cfg, sweep, name, point, retain_log, progress)
        atomic_write_text(run_dir / RESULT_FILE, json.dumps(result, indent=2) + "\n")
        done += 1
        write_leaderboard(out, list(sweep.grid))
    results = write_leaderboard(out, list(sweep.grid))
    print(f"leaderboard: {out / 'leaderboard.md'} ({len(results)}/{len(points)} runs finished)")
    return results


def _run_overrides(sweep: SweepConfig, point: dict, run_dir: Path) -> list[str]:
    return [*sweep.overrides, *(f"{k}={_value_text(v)}" for k, v in point.items()), f"output_dir={run_dir}",
            f"checkpoint.export_hf={str(sweep.export_hf).lower()}"]


def _train_and_evaluate(cfg, sweep: SweepConfig, name: str, point: dict, retain_log: dict, progress: bool) -> dict:
    from npo_jax.data.tokenize import ChatFormat
    from npo_jax.eval.aggregate import summary
    from npo_jax.eval.cli import load_scorer
    from npo_jax.eval.suite import Suite, write_outputs
    from npo_jax.train import Trainer

    run_dir = Path(cfg.output_dir)
    ckpts = run_dir / "checkpoints"
    resume = _has_checkpoint(ckpts)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, "unlearn", resume=resume, overwrite=not resume, progress=progress)
    info = trainer.train()
    del trainer
    train_s = time.perf_counter() - t0
    cache = cache_dir(cfg.cache_dir)
    scorer = load_scorer(ckpts, cfg.model.tokenizer, compute_dtype=sweep.eval.compute_dtype,
                         batch_size=sweep.eval.batch_size, max_new_tokens=sweep.eval.max_new_tokens,
                         eot_mask_quirk=cfg.data.eot_mask_quirk,  # None: what its checkpoints record
                         fmt=ChatFormat(cfg.data.system_prompt, cfg.data.date_string))
    suite = Suite(scorer, data_dir=cfg.data.dir, tfds_dir=cfg.data.tfds_dir or cache / "tfds",
                  forget_split=cfg.data.forget_split, holdout_split=sweep.eval.holdout_split,
                  limit=sweep.eval.limit, progress=progress)
    log = suite.run(retain_log)
    write_outputs(run_dir / "eval", log, overwrite=True)  # an earlier attempt's evaluation, if any
    return {"name": name, "params": point, "summary": summary(log), "run_dir": str(run_dir),
            "resumed": resume, "steps": info["steps"], "train_s": train_s,
            "eval_s": time.perf_counter() - t0 - train_s,
            "hf_export": str(run_dir / "hf") if sweep.export_hf else None}


def _has_checkpoint(ckpts: Path) -> bool:
    """A finished Orbax step folder exists (unfinished saves are temporary folders, not steps)."""
    return ckpts.is_dir() and any(p.is_dir() and p.name.isdigit() for p in ckpts.iterdir())


def read_results(out: Path) -> list[dict]:
    results = []
    for path in sorted((out / "runs").glob(f"*/{RESULT_FILE}")):
        results.append(json.loads(path.read_text()))
    return results


def rank(results: list[dict]) -> list[dict]:
    """Best forget_quality first (missing last); model_utility breaks ties."""
    def key(r):
        fq, mu = r["summary"].get("forget_quality"), r["summary"].get("model_utility")
        return (fq is None, -(fq or 0.0), -(mu or 0.0), r["name"])
    return sorted(results, key=key)


def write_leaderboard(out: Path, grid_keys: list[str]) -> list[dict]:
    ranked = rank(read_results(out))
    header = ["rank", "name", *grid_keys, *BOARD_KEYS]
    rows = [[i, r["name"], *(r["params"].get(k) for k in grid_keys), *(r["summary"].get(k) for k in BOARD_KEYS)]
            for i, r in enumerate(ranked, 1)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    atomic_write_text(out / "leaderboard.csv", buf.getvalue())

    def cell(v):
        if v is None:
            return "missing"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    md = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    md += [f"| {' | '.join(cell(v) for v in row)} |" for row in rows]
    atomic_write_text(out / "leaderboard.md", "\n".join(md) + "\n")
    if ranked:
        atomic_write(out / "leaderboard.png", lambda p: plot_leaderboard(p, ranked))
    return ranked


def plot_leaderboard(path: Path, ranked: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["summary"].get("model_utility"), r["summary"].get("forget_quality"), r["name"]) for r in ranked]
    points = [(mu, max(fq, 1e-30), n) for mu, fq, n in points if mu is not None and fq is not None]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    if points:
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=22, color="tab:blue", label="runs")
        best = points[0]
        ax.scatter([best[0]], [best[1]], s=90, marker="*", color="tab:red", label=f"rank 1: {best[2]}")
        for i, (mu, fq, n) in enumerate(points if len(points) <= 20 else points[:5]):  # all of a short board
            ax.annotate(n, (mu, fq), fontsize=6, xytext=(3, 3 if i % 2 == 0 else -9), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("model_utility")
    ax.set_ylabel("forget_quality (log scale)")
    ax.set_title(f"Sweep: {len(ranked)} runs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
