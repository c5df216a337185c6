"""The attention-mask convention travels with the model (npo_jax.mask_convention): its record in
every checkpoint and export, how eval and training resolve it, and the eval log's record.

A model folder holding only what an HF release holds is evaluated with open-unlearning's mask
(checked per item against transformers given open-unlearning's mask, `ids != eos`); a model
npo-jax trained without the quirk is evaluated without it, from its record."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tofu_fixture import add_eval_splits, make_mini_tofu, make_tiny_model_with_tokenizer

from convert import hf_to_orbax, orbax_to_hf
from npo_jax.cli import main
from npo_jax.data.tofu import load_split
from npo_jax.errors import NpoJaxError
from npo_jax.eval.aggregate import per_item_values, summary
from npo_jax.eval.hf_reference import _encode, _item
from npo_jax.mask_convention import (
    LOG_KEY,
    RECORD_FILE,
    check_retain_log,
    log_mask,
    mark_log,
    recorded_mask,
    resolve_eot_mask,
    write_record,
)
from npo_jax.run_config import load_run_config
from npo_jax.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
NOTE = f"no {RECORD_FILE}"


def test_record_write_read_and_resolve(tmp_path, capsys):
    assert recorded_mask(tmp_path) is None
    assert resolve_eot_mask(None, tmp_path) is True  # no record: open-unlearning's convention, said once
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and NOTE in out and "open-unlearning's attention mask" in out
    assert resolve_eot_mask(False, tmp_path) is False and capsys.readouterr().out == ""  # explicit wins, silently
    write_record(tmp_path, False)
    assert json.loads((tmp_path / RECORD_FILE).read_text())["eot_mask_quirk"] is False
    assert recorded_mask(tmp_path) is False
    assert resolve_eot_mask(None, tmp_path) is False and capsys.readouterr().out == ""
    assert resolve_eot_mask(True, tmp_path) is True
    (tmp_path / RECORD_FILE).write_text('{"eot_mask_quirk": "yes"}')
    with pytest.raises(NpoJaxError, match="cannot read the model's mask convention"):
        recorded_mask(tmp_path)


def test_eval_log_records_the_convention_and_readers_skip_it(capsys):
    per_item = {"forget_Q_A_Prob": {"0": {"prob": 0.5, "avg_loss": 0.69}}}
    log = mark_log({"forget_Q_A_Prob": {"agg_value": 0.5, "value_by_index": per_item["forget_Q_A_Prob"]}}, False)
    assert log[LOG_KEY] == {"eot_mask_quirk": False} and log_mask(log) is False
    assert per_item_values(log) == per_item and summary(log) == {"forget_Q_A_Prob": 0.5}
    published = json.loads(json.dumps(log))
    del published[LOG_KEY]
    assert log_mask(published) is True  # open-unlearning's logs carry no record: its convention
    assert check_retain_log(True, published) and check_retain_log(False, log)
    assert capsys.readouterr().err == ""
    assert not check_retain_log(False, published)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the padding-only mask" in err and "open-unlearning's mask" in err
    assert "no npo_jax record" in err


@pytest.mark.parametrize("path", sorted(ROOT.glob("configs/unlearn/tofu_*.yaml")), ids=lambda p: p.name)
def test_tofu_configs_reproduce_open_unlearning_on_its_models(path, tmp_path):
    """The shipped configs start from open-unlearning's released models: those have no record, so
    the run trains (and records) open-unlearning's mask, as they were trained."""
    quirk = load_run_config(path).data.eot_mask_quirk
    assert quirk in (None, True)
    assert resolve_eot_mask(quirk, tmp_path, say=None) is True


def _quiet_main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _hf_release(src: Path, dst: Path) -> Path:
    """Only what an HF release holds: config, safetensors, tokenizer (no npo_jax_* files)."""
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.startswith("npo_jax_"):
            shutil.copy2(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model fine-tuned by npo-jax without the quirk (exported), the same weights as a bare HF
    release, and `npo-jax eval` of each as a user would run it."""
    root = tmp_path_factory.mktemp("mask")
    data = add_eval_splits(make_mini_tofu(root))
    model = make_tiny_model_with_tokenizer(root, data)
    run = root / "ft"
    cfg = load_run_config(None, [
        f"model.path={model}", f"data.dir={data}", f"cache_dir={root}/cache", f"output_dir={run}",
        "data.max_length=128", "data.length_buckets=[128]", "optim.effective_batch=8", "optim.per_device_batch=8",
        "optim.epochs=3", "optim.lr=3e-3", "optim.warmup_epochs=0", "parallel.data=1",
        "checkpoint.export_dtype=float32", "data.eot_mask_quirk=false"])
    Trainer(cfg, "finetune", progress=False).train()
    release = _hf_release(run / "hf", root / "release")
    common = ["--data-dir", str(data), "--tfds-dir", str(root / "tfds"), "--limit", "4", "--max-new-tokens", "4",
              "--batch-size", "8"]
    evals = {}
    for name, argv in {
        "release": [str(release)],  # no flags
        "ours": [str(run / "hf")],  # no flags: from the export's record
        "ours_ckpt": [str(run / "checkpoints")],
        "ours_quirk": [str(run / "hf"), "--eot-mask-quirk"],
        "release_no_quirk": [str(release), "--no-eot-mask-quirk", "--retain-logs",
                             str(root / "eval_release" / "TOFU_EVAL.json")],
    }.items():
        rc, out, err = _quiet_main(["eval", *argv, *common, "--out", str(root / f"eval_{name}")])
        assert rc == 0, err
        evals[name] = {"log": json.loads((root / f"eval_{name}" / "TOFU_EVAL.json").read_text()), "out": out,
                       "err": err}
    return {"root": root, "data": data, "run": run, "release": release, "evals": evals}


def _reference_losses(world, quirk: bool) -> dict[str, list[float]]:
    """Per-item mean answer NLL from transformers' forward, given open-unlearning's mask (ids != eos,
    as its collator computes it) or all ones (the padding-only mask of an unpadded row)."""
    hf = transformers.LlamaForCausalLM.from_pretrained(world["release"], dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(world["release"])
    out = {}
    for prefix, split in (("forget", "forget10_perturbed"), ("retain", "retain_perturbed")):
        rows = list(load_split(split, world["data"], world["root"] / "tfds"))[:4]
        for metric, pairs in ((f"{prefix}_Q_A_Prob", [(r["question"], r["answer"]) for r in rows]),
                              (f"{prefix}_Q_A_PARA_Prob", [(r["question"], r["paraphrased_answer"]) for r in rows])):
            losses = []
            for q, a in pairs:
                ids, labels = _encode(tok, q, a, "You are a helpful assistant.", "10 Apr 2025")
                x = torch.tensor([ids])
                mask = (x != tok.eos_token_id).long() if quirk else torch.ones_like(x)
                with torch.no_grad():
                    losses.append(_item(hf(x, attention_mask=mask).logits[0].float(), labels)["avg_loss"])
            out[metric] = losses
    return out


def _ours(log: dict, metric: str) -> list[float]:
    vbi = log[metric]["value_by_index"]
    return [vbi[str(i)]["avg_loss"] for i in range(len(vbi))]


def _assert_matches(log: dict, reference: dict, other: dict) -> None:
    for metric, ref in reference.items():
        np.testing.assert_allclose(_ours(log, metric), ref, rtol=1e-4, err_msg=metric)
        assert np.max(np.abs(np.subtract(_ours(log, metric), other[metric]))) > 1e-3, metric  # the masks differ here


def test_hf_release_is_evaluated_as_open_unlearning_evaluates_it(world):
    """`npo-jax eval MODEL` with no flags on a bare HF folder: open-unlearning's mask, per item,
    recorded in the log, and one line saying why."""
    ev = world["evals"]["release"]
    quirk, plain = _reference_losses(world, True), _reference_losses(world, False)
    _assert_matches(ev["log"], quirk, plain)
    assert ev["log"][LOG_KEY] == {"eot_mask_quirk": True}
    assert sum(NOTE in line for line in ev["out"].splitlines()) == 1
    # --no-eot-mask-quirk overrides, with no note; its retain log (the release's) is of the other mask
    ev = world["evals"]["release_no_quirk"]
    _assert_matches(ev["log"], plain, quirk)
    assert ev["log"][LOG_KEY] == {"eot_mask_quirk": False} and NOTE not in ev["out"]
    assert "forget_quality compares two attention-mask conventions" in ev["err"]


def test_model_trained_without_the_quirk_is_evaluated_without_it(world):
    """npo-jax trained it with the padding-only mask: its run config, training checkpoints and
    export record that, and `eval` with no flags (export or checkpoints) uses it; a flag overrides."""
    run = world["run"]
    assert load_run_config(run / "config.yaml").data.eot_mask_quirk is False
    assert recorded_mask(run / "checkpoints") is False and recorded_mask(run / "hf") is False
    quirk, plain = _reference_losses(world, True), _reference_losses(world, False)
    for name in ("ours", "ours_ckpt"):
        ev = world["evals"][name]
        _assert_matches(ev["log"], plain, quirk)
        assert ev["log"][LOG_KEY] == {"eot_mask_quirk": False} and NOTE not in ev["out"]
    _assert_matches(world["evals"]["ours_quirk"]["log"], quirk, plain)


def test_eval_run_folder_and_from_log_keep_the_convention(world, tmp_path):
    root, run = world["root"], world["run"]
    rc, out, err = _quiet_main(["eval", "--run", str(run), "--limit", "2", "--max-new-tokens", "2",
                                "--tfds-dir", str(root / "tfds"), "--out", str(tmp_path / "run_eval")])
    assert rc == 0, err
    assert json.loads((tmp_path / "run_eval" / "TOFU_EVAL.json").read_text())[LOG_KEY]["eot_mask_quirk"] is False
    # re-scoring keeps the log's convention; a retain log of the other one (open-unlearning's, no record) warns
    published = dict(world["evals"]["release"]["log"])
    del published[LOG_KEY]
    (tmp_path / "ou.json").write_text(json.dumps(published))
    rc, out, err = _quiet_main(["eval", "--from-log", str(root / "eval_ours" / "TOFU_EVAL.json"), "--retain-logs",
                                str(tmp_path / "ou.json"), "--out", str(tmp_path / "rescored")])
    assert rc == 0, err
    assert json.loads((tmp_path / "rescored" / "TOFU_EVAL.json").read_text())[LOG_KEY]["eot_mask_quirk"] is False
    assert err.count("forget_quality compares two attention-mask conventions") == 1 and "no npo_jax record" in err
    rc, out, err = _quiet_main(["eval", "--from-log", str(root / "eval_release" / "TOFU_EVAL.json"), "--retain-logs",
                                str(tmp_path / "ou.json"), "--out", str(tmp_path / "rescored_ou")])
    assert rc == 0 and "conventions" not in err  # the same convention: no warning


def test_the_record_survives_conversion_both_ways(world, tmp_path):
    run, release = world["run"], world["release"]
    assert recorded_mask(orbax_to_hf(run / "checkpoints", tmp_path / "hf", progress=False)) is False
    assert recorded_mask(hf_to_orbax(run / "hf", tmp_path / "orbax", progress=False)) is False
    assert recorded_mask(orbax_to_hf(tmp_path / "orbax", tmp_path / "hf2", progress=False)) is False
    # an HF release has no record, and its conversions stay without one (open-unlearning's convention)
    assert recorded_mask(hf_to_orbax(release, tmp_path / "release_orbax", progress=False)) is None
    assert recorded_mask(orbax_to_hf(tmp_path / "release_orbax", tmp_path / "release_hf", progress=False)) is None


def test_training_takes_the_starting_models_convention(world, tmp_path, capsys):
    """Unlearning with `data.eot_mask_quirk` unset trains with the starting model's record (the
    padding-only mask of our run), or open-unlearning's mask from a release (one line says so), and
    records what it used."""
    root = world["root"]
    for start, expected in ((world["run"] / "checkpoints", False), (world["release"], True)):
        out = tmp_path / f"npo_{expected}"
        cfg = load_run_config(None, [
            f"model.path={start}", f"data.dir={world['data']}", f"cache_dir={root}/cache", f"output_dir={out}",
            "data.max_length=128", "data.length_buckets=[128]", "optim.effective_batch=8",
            "optim.per_device_batch=8", "parallel.data=1", "checkpoint.export_hf=false"])
        assert cfg.data.eot_mask_quirk is None
        Trainer(cfg, "unlearn", progress=False, max_steps=1).train()
        assert load_run_config(out / "config.yaml").data.eot_mask_quirk is expected
        assert recorded_mask(out / "checkpoints") is expected
        assert (NOTE in capsys.readouterr().out) is expected


def test_the_readmes_real_run_never_mixes_conventions(world, tmp_path):
    """The README's real run on local files: convert open-unlearning's release, unlearn with the
    shipped seed config, evaluate the run against a published (record-less) retain log, export:
    open-unlearning's mask at every step, and no convention warning."""
    root = world["root"]
    ckpt = hf_to_orbax(world["release"], tmp_path / "ckpt", progress=False)  # step 1
    run = tmp_path / "npo_3b"
    cfg = load_run_config(ROOT / "configs/unlearn/tofu_llama3.2_3b_npo.yaml", [  # step 2, sized for a CPU
        f"model.path={ckpt}", f"output_dir={run}", f"data.dir={world['data']}", f"cache_dir={root}/cache",
        "model.compute_dtype=float32", "data.max_length=128", "data.length_buckets=[128]",
        "optim.effective_batch=8", "optim.per_device_batch=8", "parallel.fsdp=1", "parallel.data=1",
        "checkpoint.export_dtype=float32"])
    Trainer(cfg, "unlearn", progress=False, max_steps=1).train()
    assert recorded_mask(run / "checkpoints") is True and recorded_mask(run / "hf") is True
    published = dict(world["evals"]["release"]["log"])  # open-unlearning's retain log carries no record
    del published[LOG_KEY]
    (tmp_path / "retain90.json").write_text(json.dumps(published))
    rc, out, err = _quiet_main(["eval", "--run", str(run), "--holdout-split", "holdout10", "--retain-logs",
                                str(tmp_path / "retain90.json"), "--limit", "2", "--max-new-tokens", "2"])  # step 3
    assert rc == 0, err
    assert "conventions" not in err and NOTE not in out
    assert json.loads((run / "eval" / "TOFU_EVAL.json").read_text())[LOG_KEY] == {"eot_mask_quirk": True}
    assert recorded_mask(orbax_to_hf(run / "checkpoints", tmp_path / "export", progress=False)) is True  # step 4
