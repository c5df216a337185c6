"""`npo-jax parity MODEL` on a tiny model: it passes on a sound conversion, and a corrupted
conversion or a wrong RoPE setting fail the checks that should catch them, by name."""

import json
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tofu_fixture import add_eval_splits, make_mini_tofu, make_tiny_model_with_tokenizer

import npo_jax.parity_run as parity_run
from npo_jax.cli import main
from npo_jax.mask_convention import describe, write_record
from npo_jax.run_config import load_run_config, to_yaml

PARTS = {"round trip", "logits", "generation", "objective", "evaluation"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    data = add_eval_splits(make_mini_tofu(root))
    return root, data, make_tiny_model_with_tokenizer(root, data)


def _parity(tiny, model, out, *extra):
    root, data, _ = tiny
    return main(["parity", str(model), "--data-dir", str(data), "--tfds-dir", str(root / "tfds"), "--items", "3",
                 "--max-new-tokens", "8", "--out", str(out), *extra])


def _report(out) -> tuple[dict, set[str]]:
    report = json.loads((out / "parity.json").read_text())
    return report, {c["name"] for c in report["checks"] if not c["passed"]}


def test_passes_on_an_hf_folder(tiny, tmp_path, capsys):
    _, _, model = tiny
    assert _parity(tiny, model, tmp_path / "out") == 0
    report, failed = _report(tmp_path / "out")
    assert report["passed"] and not failed and report["kind"] == "hf"
    assert {c["part"] for c in report["checks"]} == PARTS
    names = [c["name"] for c in report["checks"]]
    for name in ("round trip: tensors (HF -> Orbax -> HF, float32)", "logits f32: right padded",
                 "logits f32: left padded", "logits bf16: argmax agreement", "logits bf16: mean KL",
                 "objective: grad_norm", "eval: probability", "eval: truth ratio", "eval: ROUGE-L recall"):
        assert name in names
    assert any(n.startswith("objective NPO (beta 0.1, alpha 2, gamma 1)") for n in names)  # the seed's recipe
    assert "no --config" in report["notes"][0]  # an HF folder without a record: open-unlearning's mask
    assert report["settings"]["eot_mask_quirk"] is True and "no record: open-unlearning's" in report["notes"][1]
    assert {"round trip", "jax: logits", "torch: objective"} <= set(report["seconds"])
    assert report["peak_rss_gib_total"] > 0
    out = capsys.readouterr().out
    assert "all 14 checks pass" in out and "tolerance" in out and "peak RSS" in out
    assert (tmp_path / "out" / "parity.txt").read_text().strip() in out


def test_mask_convention_flag_config_record(tiny, tmp_path):
    """The mask: --eot-mask-quirk, else the config's data.eot_mask_quirk, else the model's record,
    else open-unlearning's."""
    _, _, model = tiny
    trained = tmp_path / "trained"
    shutil.copytree(model, trained)
    write_record(trained, False)

    def mask(folder, flag=None, config=None):
        args = SimpleNamespace(config=config, items=1, batch_size=1, max_new_tokens=1, eot_mask_quirk=flag)
        settings, _, notes = parity_run.load_settings(parity_run.resolve_model(folder), args)
        return settings.eot_mask_quirk, notes[-1]

    assert mask(model) == (True, "mask: " + describe(True) + ", from no record: open-unlearning's")
    assert mask(trained) == (False, "mask: " + describe(False) + ", from the model's record")
    assert mask(trained, flag=True)[0] is True and mask(model, flag=False)[0] is False
    config = tmp_path / "quirk.yaml"
    config.write_text("data:\n  eot_mask_quirk: true\n")
    assert mask(trained, config=config) == (True, "mask: " + describe(True) + ", from the config")
    assert mask(trained, flag=False, config=config)[0] is False


def test_passes_on_a_run_folder_with_its_config(tiny, tmp_path):
    """A run folder (config.yaml + checkpoints/): Orbax -> HF -> Orbax, the export is what
    transformers loads, and the run's method and mask convention (open-unlearning's) are used."""
    root, data, model = tiny
    run = tmp_path / "run"
    parity_run.hf_to_orbax(model, run / "checkpoints", progress=False)
    cfg = load_run_config(None, [f"model.path={model}", f"output_dir={run}", f"data.dir={data}",
                                 f"data.tfds_dir={root / 'tfds'}", "data.eot_mask_quirk=true", "method.name=SimNPO",
                                 "method.beta=4.5", "method.gamma=0.125"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    assert main(["parity", str(run), "--items", "3", "--max-new-tokens", "8"]) == 0
    report, failed = _report(run / "parity")
    assert not failed and report["kind"] == "checkpoint"
    assert report["checks"][0]["name"] == "round trip: tensors (Orbax -> HF -> Orbax, float32)"
    assert report["settings"]["eot_mask_quirk"] is True and report["settings"]["method"] == "SimNPO"
    assert any(c["name"].startswith("objective SimNPO (beta 4.5") for c in report["checks"])


def _corrupting(tensor: str):
    """hf_to_orbax that converts a copy of the folder with one tensor perturbed."""
    real = parity_run.hf_to_orbax

    def convert(src, dst, **kw):
        bad = dst.parent / "corrupted_src"
        shutil.copytree(src, bad)
        tensors = load_file(bad / "model.safetensors")
        rng = np.random.default_rng(0)
        tensors[tensor] = tensors[tensor] + 0.05 * rng.standard_normal(tensors[tensor].shape).astype(np.float32)
        save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
        return real(bad, dst, **kw)

    return convert


def test_corrupted_conversion_fails_round_trip_and_logits(tiny, tmp_path, monkeypatch, capsys):
    _, _, model = tiny
    tensor = "model.layers.1.mlp.down_proj.weight"
    monkeypatch.setattr(parity_run, "hf_to_orbax", _corrupting(tensor))
    assert _parity(tiny, model, tmp_path / "out") == 1
    report, failed = _report(tmp_path / "out")
    assert not report["passed"]
    assert {"round trip: tensors (HF -> Orbax -> HF, float32)", "logits f32: right padded",
            "logits f32: left padded"} <= failed
    assert "round trip: model config (HF -> Orbax)" not in failed
    rt = next(c for c in report["checks"] if c["name"].startswith("round trip: tensors"))
    assert rt["ours"] == "19/20 identical" and tensor in rt["detail"]
    out = capsys.readouterr().out
    assert "parity: FAIL: round trip: tensors" in out and tensor in out


def test_wrong_rope_fails_logits_and_generation(tiny, tmp_path, monkeypatch):
    """The checkpoint's config.json says another rope_theta than the model was made with. With the
    padding-only mask: under open-unlearning's, this random model's 8-token greedy answers to the
    3 questions happen to come out the same (the logits checks fail either way)."""
    _, _, model = tiny
    real = parity_run.hf_to_orbax

    def convert(src, dst, **kw):
        out = real(src, dst, **kw)
        raw = json.loads((out / "config.json").read_text())
        rope = raw.get("rope_parameters") or raw
        rope["rope_theta"] = rope["rope_theta"] * 50
        (out / "config.json").write_text(json.dumps(raw))
        return out

    monkeypatch.setattr(parity_run, "hf_to_orbax", convert)
    assert _parity(tiny, model, tmp_path / "out", "--no-eot-mask-quirk") == 1
    report, failed = _report(tmp_path / "out")
    assert {"logits f32: right padded", "logits f32: left padded", "generation: greedy, 8 new tokens",
            "round trip: model config (HF -> Orbax)"} <= failed
    assert "round trip: tensors (HF -> Orbax -> HF, float32)" not in failed  # the weights are fine
    config = next(c for c in report["checks"] if c["name"] == "round trip: model config (HF -> Orbax)")
    assert "rope_theta: 500000.0 vs 10000.0" in config["detail"]


def test_bad_input_and_missing_torch(tiny, tmp_path, monkeypatch, capsys):
    _, data, model = tiny
    cases = [(["parity", str(tmp_path / "nowhere")], "no such folder"),
             (["parity", str(data)], "not an HF model folder"),
             (["parity", str(model), "--items", "0"], "--items must be at least 1"),
             (["parity", str(model), "--data-dir", str(data), "--tfds-dir", str(tmp_path / "tfds"), "--items", "1000"],
              "--items 1000: the evaluation split")]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("npo-jax: error:") and message in err and "Traceback" not in err, err
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert main(["parity", str(model)]) == 2
    assert "pip install 'npo-jax[parity]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
