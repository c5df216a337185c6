"""Every shipped config loads against the schema; the seed run's recipe is what it says."""

from pathlib import Path

import pytest

from npo_jax.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIGS = sorted([*ROOT.glob("unlearn/*.yaml"), *ROOT.glob("finetune/*.yaml")])


def test_every_config_is_checked():
    other = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.yaml")} - {
        p.relative_to(ROOT).as_posix() for p in RUN_CONFIGS}
    assert other == {"demo.yaml", "sweep/tofu_llama3.2_3b_npo_grid.yaml"}  # tested in test_demo / test_sweep


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_run_config(path)
    assert cfg.optim.effective_batch == 32


def test_seed_run_recipe():
    cfg = load_run_config(Path(__file__).resolve().parents[1] / "configs/unlearn/tofu_llama3.2_3b_npo.yaml")
    assert (cfg.method.name, cfg.method.alpha, cfg.method.beta, cfg.method.gamma) == ("NPO", 2.0, 0.1, 1.0)
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.weight_decay) == (2e-5, 5, 1.0, 0.01)
    assert (cfg.data.forget_split, cfg.data.retain_split) == ("forget10", "retain90")


def test_overrides_apply():
    path = Path(__file__).resolve().parents[1] / "configs/unlearn/tofu_llama3.2_3b_npo.yaml"
    cfg = load_run_config(path, ["optim.lr=1e-5", "parallel.strategy=pmap"])
    assert cfg.optim.lr == 1e-5 and cfg.parallel.strategy == "pmap"


def test_demo_config_loads():
    from npo_jax.demo import load_demo_config

    cfg = load_demo_config(Path(__file__).resolve().parents[1] / "configs/demo.yaml")
    assert (cfg.alpha, cfg.beta, cfg.unlearn.epochs) == (2.0, 0.1, 5)


@pytest.mark.parametrize(("given", "used"), [(None, "forget05"), ("forget10", "forget10"), ("forget01", "forget01")])
def test_eval_run_folder_forget_split(tmp_path, given, used):
    """`npo-jax eval --run RUN`: the run's forget split unless --forget-split names one (forget10 too)."""
    from npo_jax.cli import build_parser
    from npo_jax.eval.cli import apply_run_folder

    (tmp_path / "config.yaml").write_text("model:\n  path: m\noutput_dir: o\ndata:\n  forget_split: forget05\n")
    args = build_parser().parse_args(["eval", "--run", str(tmp_path),
                                      *(["--forget-split", given] if given else [])])
    apply_run_folder(args)
    assert args.forget_split == used
