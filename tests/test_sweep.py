"""`npo-jax sweep`: a 2x2 grid is killed after its first run, resumes without redoing it, and
ranks the runs by forget_quality."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tofu_fixture import add_eval_splits, make_mini_tofu, make_tiny_model_with_tokenizer

from npo_jax.errors import NpoJaxError
from npo_jax.eval.cli import load_scorer
from npo_jax.eval.suite import Suite, write_outputs
from npo_jax.run_config import load_run_config
from npo_jax.sweep import RESULT_FILE, SweepConfig, grid_points, load_sweep_config, run_sweep, sweep_points

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    data = add_eval_splits(make_mini_tofu(root))
    model = make_tiny_model_with_tokenizer(root, data)
    # the starting model's log stands in for the retain model's (forget_quality's reference)
    scorer = load_scorer(model, batch_size=16, max_new_tokens=8)
    log = Suite(scorer, data_dir=data, tfds_dir=root / "cache" / "tfds", holdout_split="holdout10",
                progress=False).run()
    write_outputs(root / "retain_eval", log)
    run_cfg = root / "run.yaml"
    run_cfg.write_text(f"""
model: {{path: {model}}}
data: {{dir: {data}, max_length: 128, length_buckets: [96, 128]}}
cache_dir: {root / 'cache'}
method: {{name: NPO, alpha: 1.0}}
optim: {{epochs: 2, effective_batch: 8, per_device_batch: 8, warmup_epochs: 0.5}}
parallel: {{data: 1}}
checkpoint: {{every_steps: 1, export_hf: false}}
""")
    sweep_cfg = root / "sweep.yaml"
    sweep_cfg.write_text(f"""
run_config: {run_cfg}
output_dir: {root / 'out'}
grid:
  optim.lr: [3.0e-3, 3.0e-4]
  method.beta: [0.1, 0.5]
eval: {{retain_logs: {root / 'retain_eval' / 'TOFU_EVAL.json'}, batch_size: 16, max_new_tokens: 8,
        compute_dtype: float32, holdout_split: holdout10}}
""")
    return root, sweep_cfg


def test_grid_names_and_order():
    points = grid_points({"optim.epochs": [5, 10], "optim.lr": [1e-5, 2e-5]})
    assert [n for n, _ in points] == ["epochs5-lr1e-05", "epochs5-lr2e-05", "epochs10-lr1e-05", "epochs10-lr2e-05"]
    assert points[1][1] == {"optim.epochs": 5, "optim.lr": 2e-5}


def test_shipped_grid_is_the_seed_sweep():
    cfg = load_sweep_config(ROOT / "configs/sweep/tofu_llama3.2_3b_npo_grid.yaml", ["eval.retain_logs=x"])
    points = dict(grid_points(cfg.grid))
    assert len(points) == 54
    assert {"optim.epochs": 5, "optim.lr": 2e-5, "method.alpha": 2.0, "method.beta": 0.1} in points.values()


def test_bad_sweep_configs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_config: x.yaml\noutput_dir: o\ngrid: {optim.lr: []}\neval: {retain_logs: r}\n")
    with pytest.raises(NpoJaxError, match="grid must map"):
        load_sweep_config(bad)
    bad.write_text("run_config: x.yaml\noutput_dir: o\ngrid: {optim.lr: [1]}\nevl: {}\n")
    with pytest.raises(NpoJaxError, match="evl"):
        load_sweep_config(bad)
    bad.write_text("run_config: null\noutput_dir: o\nmethods: {WGA: 3}\neval: {retain_logs: r}\n")
    with pytest.raises(NpoJaxError, match="methods.WGA"):
        load_sweep_config(bad)
    bad.write_text("run_config: null\noutput_dir: o\neval: {retain_logs: r}\n")
    with pytest.raises(NpoJaxError, match="or methods name the methods"):
        load_sweep_config(bad)
    bad.write_text(f"run_config: x.yaml\noutput_dir: {tmp_path / 'o'}\ngrid: {{optim.lr: [1]}}\n"
                   f"eval: {{retain_logs: {tmp_path / 'missing.json'}}}\n")
    with pytest.raises(NpoJaxError, match="missing.json"):
        run_sweep(bad)
    assert not (tmp_path / "o").exists()


def test_sweep_killed_after_first_run_resumes_and_ranks(sweep_setup, capsys):
    root, sweep_cfg = sweep_setup
    out = root / "out"
    proc = subprocess.Popen([sys.executable, "-m", "npo_jax.cli", "sweep", str(sweep_cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(out.glob(f"runs/*/{RESULT_FILE}")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = list(out.glob(f"runs/*/{RESULT_FILE}"))
    assert len(first) == 1, "the sweep was to be killed after its first run"
    first_run = first[0].parent
    before = {p.name: p.read_bytes() for p in (first[0], first_run / "metrics.jsonl")}

    results = run_sweep(sweep_cfg, progress=False)
    printed = capsys.readouterr().out
    assert f"{first_run.name}: finished earlier, skipped" in printed
    assert {p.name: p.read_bytes() for p in (first[0], first_run / "metrics.jsonl")} == before  # not redone
    assert len(results) == 4
    for r in results:  # every run trained all its steps, once each (resumed runs drop re-run records)
        steps = [json.loads(line)["step"] for line in (root / r["run_dir"] / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, r["steps"] + 1))

    with open(out / "leaderboard.csv") as f:
        board = list(csv.DictReader(f))
    assert [row["name"] for row in board] == [r["name"] for r in results]
    fq_mu = []
    for row in board:  # the board's values are each run's own evaluation summary
        summary = json.loads((out / "runs" / row["name"] / "eval" / "TOFU_SUMMARY.json").read_text())
        assert float(row["forget_quality"]) == pytest.approx(summary["forget_quality"], rel=1e-12)
        assert float(row["model_utility"]) == pytest.approx(summary["model_utility"], rel=1e-12)
        fq_mu.append((summary["forget_quality"], summary["model_utility"]))
    assert fq_mu == sorted(fq_mu, reverse=True)  # best forget_quality first, model_utility breaks ties
    assert len(set(fq for fq, _ in fq_mu)) > 1  # the grid really changed the outcome
    md = (out / "leaderboard.md").read_text().splitlines()
    assert len(md) == 2 + 4 and board[0]["name"] in md[2]
    assert (out / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_method_points_label_overrides_and_grid():
    cfg = SweepConfig(run_config=None, output_dir="o", grid={"optim.lr": [1e-4, 2e-4]},
                      methods={"WGA": {}, "NPO_a2": {"method.name": "NPO", "method.alpha": 2.0}})
    points = sweep_points(cfg)
    assert [n for n, _ in points] == ["WGA-lr0.0001", "WGA-lr0.0002", "NPO_a2-lr0.0001", "NPO_a2-lr0.0002"]
    assert points[0][1] == {"method.name": "WGA", "optim.lr": 1e-4}
    assert points[3][1] == {"method.name": "NPO", "method.alpha": 2.0, "optim.lr": 2e-4}
    assert [n for n, _ in sweep_points(SweepConfig(run_config=None, output_dir="o", methods={"CEU": {}}))] == ["CEU"]


def test_shipped_method_sweep_runs_every_registered_method_at_its_defaults():
    """configs/sweep/demo_methods.yaml: one run per method module (IdkDPO is DPO), each run config
    valid and at open-unlearning's method_args (e.g. SimNPO's beta 4.5 and gamma 0.125)."""
    from npo_jax import methods
    from npo_jax.sweep import _run_overrides

    cfg = load_sweep_config(ROOT / "configs/sweep/demo_methods.yaml")
    points = sweep_points(cfg)
    ran = [methods.get(p["method.name"]).NAME for _, p in points]
    assert sorted(ran) == sorted({methods.get(n).NAME for n in methods.NAMES}), \
        "a registered method is missing from configs/sweep/demo_methods.yaml (one line under methods:)"
    runs = {name: load_run_config(cfg.run_config, _run_overrides(cfg, p, Path("o") / name)) for name, p in points}
    assert (runs["SimNPO"].method.beta, runs["SimNPO"].method.gamma) == (4.5, 0.125)
    assert (runs["NPO"].method.alpha, runs["WGA"].method.beta, runs["SatImp"].method.gamma) == (1.0, 1.0, 0.1)
    assert runs["DPO"].data.idk_path == "runs/demo/data/idontknow.jsonl"
    assert {(r.optim.lr, r.optim.epochs, r.data.max_length) for r in runs.values()} == {(3e-4, 5, 80)}


def test_method_sweep_and_its_runs_through_eval_and_export(sweep_setup, tmp_path):
    """A WGA and a DPO run from one `methods` sweep: trained, evaluated, exported (the HF folder's
    logits in transformers match our params) and re-evaluated by `npo-jax eval --run`."""
    from npo_jax.cli import main
    from npo_jax.demo import _export_check

    root, _ = sweep_setup
    (root / "idk.jsonl").write_text("I don't know.\nNo idea.\n")
    sweep_cfg = tmp_path / "methods.yaml"
    sweep_cfg.write_text(f"""
run_config: {root / 'run.yaml'}
output_dir: {tmp_path / 'out'}
methods: {{WGA: {{}}, DPO: {{data.idk_path: {root / 'idk.jsonl'}}}}}
overrides: [optim.epochs=1, optim.lr=1.0e-3, checkpoint.export_dtype=float32]
export_hf: true
eval: {{retain_logs: {root / 'retain_eval' / 'TOFU_EVAL.json'}, batch_size: 16, max_new_tokens: 8,
        compute_dtype: float32, holdout_split: holdout10, limit: 2}}
""")
    results = run_sweep(sweep_cfg, progress=False)
    assert sorted(r["name"] for r in results) == ["DPO", "WGA"]
    with open(tmp_path / "out" / "leaderboard.csv") as f:
        assert sorted(row["name"] for row in csv.DictReader(f)) == ["DPO", "WGA"]
    runs = {r["name"]: Path(r["run_dir"]) for r in results}
    saved = {n: load_run_config(d / "config.yaml") for n, d in runs.items()}
    assert (saved["WGA"].method.name, saved["WGA"].method.beta) == ("WGA", 1.0)  # WGA.yaml's beta, not NPO's
    assert saved["DPO"].method.name == "DPO"
    for run in runs.values():
        assert _export_check(run) < 1e-4
    assert main(["eval", "--run", str(runs["DPO"]), "--out", str(tmp_path / "eval_dpo"), "--limit", "2",
                 "--max-new-tokens", "8", "--holdout-split", "holdout10",
                 "--retain-logs", str(root / "retain_eval" / "TOFU_EVAL.json")]) == 0
    summary = json.loads((tmp_path / "eval_dpo" / "TOFU_SUMMARY.json").read_text())
    swept = json.loads((runs["DPO"] / "eval" / "TOFU_SUMMARY.json").read_text())
    assert summary["forget_Q_A_Prob"] == pytest.approx(swept["forget_Q_A_Prob"], rel=1e-6)
