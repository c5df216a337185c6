"""Every shipped config loads against the schema; the seed run's recipe is what it says."""

from pathlib import Path

import pytest

from npo_jax.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIGS = sorted([*ROOT.glob("unlearn/*.yaml"), *ROOT.glob("finetune/*.yaml")])


def test_every_config_is_checked():
    other = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.yaml")} - {
        p.relative_to(ROOT).as_posix() for p in RUN_CONFIGS}
    assert other == {"demo.yaml",
                     "sweep/tofu_llama3.2_3b_npo_grid.yaml", "sweep/demo_methods.yaml"}  # test_demo/test_sweep


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


@pytest.mark.parametrize(("name", "lr", "alpha", "epochs"), [("tofu_llama3.2_1b_npo.yaml", 5e-5, 1.0, 10),
                                                             ("tofu_llama3.1_8b_npo.yaml", 5e-5, 2.0, 5)])
def test_seed_sibling_recipes(name, lr, alpha, epochs):
    """The audit's rank-1 1B and 8B NPO recipes, beside the seed's."""
    cfg = load_run_config(ROOT / "unlearn" / name)
    assert (cfg.method.name, cfg.method.alpha, cfg.method.beta) == ("NPO", alpha, 0.1)
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.warmup_epochs) == (lr, epochs, 1.0)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_tofu_configs_run_as_open_unlearning(path):
    """Loss groups of 4, HF Trainer's epochs and (unlearning) a fresh retain partner each epoch;
    the schema's defaults are npo-jax's own (drop, fixed)."""
    cfg = load_run_config(path)
    assert (cfg.optim.loss_group, cfg.optim.epoch_mode) == (4, "stream")
    if "unlearn" in path.parts:
        assert cfg.data.retain_pairing == "fresh"
    default = load_run_config(None, ["output_dir=o", "model.path=m"])
    assert (default.optim.loss_group, default.optim.epoch_mode, default.data.retain_pairing) == (0, "drop", "fixed")


def test_demo_lora_section_reaches_the_unlearning_run():
    """`npo-jax demo OUT lora.rank=8 ...`: the demo's lora section becomes the unlearning run's."""
    from npo_jax.demo import _lora_overrides, _run_config, load_demo_config

    assert _lora_overrides(load_demo_config(None)) == {}  # rank 0: the whole model, as before
    cfg = load_demo_config(None, ["lora.rank=8", "lora.alpha=32", "lora.targets=[q_proj,v_proj]"])
    run = _run_config(".", ".", ".", ".", cfg.unlearn, cfg, **_lora_overrides(cfg))
    assert (run.lora.rank, run.lora.alpha, list(run.lora.targets)) == (8, 32.0, ["q_proj", "v_proj"])
