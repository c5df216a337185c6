"""Bad input: one clear message naming the file and tensor or field, exit code 2, no output folder;
an existing output folder is replaced only when asked, and only if it holds a previous output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_models import make_hf_model, tiny_config
from safetensors.numpy import load_file, save_file
from test_bad_config import cli_fails

from npo_jax.cli import main

TENSOR = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture
def hf_dir(tmp_path):
    return make_hf_model(tmp_path / "hf", tiny_config(), dtype=torch.float32)


def _edit_weights(folder, edit):
    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})
    return file


def _edit_config(folder, **changes):
    raw = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    (folder / "config.json").write_text(json.dumps(raw))


def _assert_fails(capsys, argv, *fragments):
    dst = argv[3]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("error:") == 1
    for fragment in fragments:
        assert str(fragment) in err, (fragment, err)
    parent = Path(dst).parent
    assert not Path(dst).exists()
    assert not [p for p in parent.iterdir() if ".tmp-" in p.name], "temporary folder left behind"


def _h2o(src, tmp_path):
    return ["convert", "hf-to-orbax", str(src), str(tmp_path / "out")]


def test_missing_tensor(hf_dir, tmp_path, capsys):
    _edit_weights(hf_dir, lambda t: t.pop(TENSOR))
    _assert_fails(capsys, _h2o(hf_dir, tmp_path), hf_dir, f"missing tensor '{TENSOR}'")


def test_unexpected_tensor(hf_dir, tmp_path, capsys):
    file = _edit_weights(hf_dir, lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", np.zeros(3, np.float32)))
    _assert_fails(capsys, _h2o(hf_dir, tmp_path), file, "unexpected tensor 'model.layers.0.mlp.extra.weight'")


def test_lm_head_in_tied_model(hf_dir, tmp_path, capsys):
    file = _edit_weights(hf_dir, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"]))
    _assert_fails(capsys, _h2o(hf_dir, tmp_path), file, "'lm_head.weight'", "tie_word_embeddings")


def test_wrong_shape(hf_dir, tmp_path, capsys):
    file = _edit_weights(hf_dir, lambda t: t.__setitem__(TENSOR, t[TENSOR][:-1]))
    _assert_fails(capsys, _h2o(hf_dir, tmp_path), file, f"'{TENSOR}' has shape [135, 64], expected [136, 64]")


def test_wrong_dtype(hf_dir, tmp_path, capsys):
    file = _edit_weights(hf_dir, lambda t: t.__setitem__(TENSOR, t[TENSOR].astype(np.int32)))
    _assert_fails(capsys, _h2o(hf_dir, tmp_path), file, f"'{TENSOR}' has dtype I32")


def test_truncated_safetensors(hf_dir, tmp_path, capsys):
    file = hf_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    _assert_fails(capsys, _h2o(hf_dir, tmp_path), file, "not a readable safetensors file")


def test_corrupt_safetensors_header(hf_dir, tmp_path, capsys):
    file = hf_dir / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[12:20] = b"\xff" * 8
    file.write_bytes(bytes(data))
    _assert_fails(capsys, _h2o(hf_dir, tmp_path), file, "not a readable safetensors file")


def test_index_points_to_missing_shard(tmp_path, capsys):
    src = make_hf_model(tmp_path / "hf", tiny_config(), dtype=torch.float32, max_shard_size="60KB")
    shards = sorted(src.glob("model-*.safetensors"))
    shards[-1].unlink()
    _assert_fails(capsys, _h2o(src, tmp_path), "model.safetensors.index.json", f"missing shard file {shards[-1]}")


def test_index_maps_tensor_to_wrong_shard(tmp_path, capsys):
    src = make_hf_model(tmp_path / "hf", tiny_config(), dtype=torch.float32, max_shard_size="60KB")
    index_file = src / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    wrong = next(s for s in shards if s != index["weight_map"]["model.norm.weight"])
    index["weight_map"]["model.norm.weight"] = wrong
    index_file.write_text(json.dumps(index))
    _assert_fails(capsys, _h2o(src, tmp_path), index_file, "'model.norm.weight'", wrong)


@pytest.mark.parametrize("field,value,fragment", [
    ("rope_parameters.rope_type", "yarn", "field 'rope_parameters.rope_type' is 'yarn'"),
    ("hidden_act", "gelu", "field 'hidden_act' is 'gelu'"),
    ("model_type", "mistral", "field 'model_type' is 'mistral'"),
    ("num_key_value_heads", 3, "field 'num_key_value_heads'"),
])
def test_unsupported_config_values(hf_dir, tmp_path, capsys, field, value, fragment):
    _edit_config(hf_dir, **{field: value})
    _assert_fails(capsys, _h2o(hf_dir, tmp_path), hf_dir / "config.json", fragment)


def test_unsupported_rope_type_v4_dialect(tmp_path, capsys):
    src = make_hf_model(tmp_path / "hf", tiny_config(), dtype=torch.float32, dialect="4")
    _edit_config(src, **{"rope_scaling.rope_type": "dynamic"})
    _assert_fails(capsys, _h2o(src, tmp_path), "field 'rope_scaling.rope_type' is 'dynamic'")


def test_missing_config_and_not_a_model_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_fails(capsys, _h2o(empty, tmp_path), empty / "config.json", "not found")
    (empty / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    _assert_fails(capsys, _h2o(empty, tmp_path), empty, "no model.safetensors or model.safetensors.index.json")


def test_orbax_folder_that_is_not_a_checkpoint(hf_dir, tmp_path, capsys):
    argv = ["convert", "orbax-to-hf", str(hf_dir), str(tmp_path / "out")]
    _assert_fails(capsys, argv, hf_dir, "not an npo-jax Orbax checkpoint")


def test_damaged_orbax_checkpoint(hf_dir, tmp_path, capsys):
    assert main(["convert", "hf-to-orbax", str(hf_dir), str(tmp_path / "ckpt")]) == 0
    for f in (tmp_path / "ckpt" / "params").rglob("*"):
        if f.is_file() and f.name in ("_METADATA", "manifest.ocdbt"):
            f.write_bytes(b"garbage")
    argv = ["convert", "orbax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]
    _assert_fails(capsys, argv, tmp_path / "ckpt" / "params")


def test_checkpoint_that_does_not_fit_its_config(hf_dir, tmp_path, capsys):
    assert main(["convert", "hf-to-orbax", str(hf_dir), str(tmp_path / "ckpt")]) == 0
    _edit_config(tmp_path / "ckpt", intermediate_size=100)
    argv = ["convert", "orbax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]
    _assert_fails(capsys, argv, "parameter 'layers/mlp/gate_proj/kernel' has shape [2, 64, 136], expected [2, 64, 100]")


def test_output_exists_unless_overwrite(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", "hf-to-orbax", str(hf_dir), str(out)]) == 2
    assert "output folder exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["convert", "hf-to-orbax", str(hf_dir), str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "params").is_dir()


def test_bad_mesh(hf_dir, tmp_path, capsys):
    argv = ["convert", "hf-to-orbax", str(hf_dir), str(tmp_path / "out"), "--mesh"]
    _assert_fails(capsys, [*argv, "fsdp=16"], "needs 16 devices, have 8")
    _assert_fails(capsys, [*argv, "model=8"], "--mesh: cannot read 'model=8'")


def test_bad_dtype_and_shard_size(hf_dir, tmp_path, capsys):
    _assert_fails(capsys, ["convert", "hf-to-orbax", str(hf_dir), str(tmp_path / "out"), "--dtype", "int8"],
                  "unsupported dtype 'int8'")
    assert main(["convert", "hf-to-orbax", str(hf_dir), str(tmp_path / "ckpt")]) == 0
    _assert_fails(capsys, ["convert", "orbax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"),
                           "--max-shard-size", "lots"], "--max-shard-size")


# -- output folders: nothing deleted, nothing half-made -------------------------------------------

LOG = {"forget_Q_A_Prob": {"value_by_index": {"0": {"prob": 0.5, "avg_loss": 0.69}}}}


@pytest.fixture
def log_file(tmp_path):
    path = tmp_path / "log.json"
    path.write_text(json.dumps(LOG))
    return path


def _run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    return run


def test_eval_out_exists(capsys, tmp_path, log_file):
    """`eval --out RUN` must not delete the run: refused without --overwrite, and with it too,
    since RUN holds files eval does not write."""
    run = _run_folder(tmp_path)
    rescore = ["eval", "--from-log", log_file, "--out", run]
    cli_fails(capsys, rescore, f"{run}: output folder exists (pass --overwrite", watch=tmp_path)
    cli_fails(capsys, [*rescore, "--overwrite"], f"{run}: not replaced, even with --overwrite: it holds checkpoints, "
              "config.yaml", watch=tmp_path)


def test_eval_overwrite_replaces_a_previous_evaluation_only(capsys, tmp_path, log_file):
    out = tmp_path / "eval"
    assert main(["eval", "--from-log", str(log_file), "--out", str(out)]) == 0
    first = (out / "TOFU_EVAL.json").stat().st_mtime_ns
    cli_fails(capsys, ["eval", "--from-log", log_file, "--out", out], "--overwrite", watch=tmp_path)
    assert main(["eval", "--from-log", str(log_file), "--out", str(out), "--overwrite"]) == 0
    assert (out / "TOFU_EVAL.json").stat().st_mtime_ns != first
    (out / "notes.txt").write_text("mine")
    cli_fails(capsys, ["eval", "--from-log", log_file, "--out", out, "--overwrite"], "it holds notes.txt",
              watch=tmp_path)


def test_audit_out_exists(capsys, tmp_path, hf_dir):
    run = _run_folder(tmp_path)
    audit = ["audit", "--models", f"m={hf_dir}", "--out", run]
    cli_fails(capsys, audit, f"{run}: output folder exists (pass --overwrite", watch=tmp_path)
    cli_fails(capsys, [*audit, "--overwrite"], "not replaced, even with --overwrite: it holds checkpoints",
              watch=tmp_path)


def test_overwrite_recognises_a_previous_output(tmp_path):
    from npo_jax.audit.cli import AUDIT_FILES
    from npo_jax.fs import atomic_output_dir

    out = tmp_path / "audit"
    out.mkdir()
    for name in AUDIT_FILES:
        (out / name).write_text("old")
    with atomic_output_dir(out, overwrite=True, replaces=AUDIT_FILES) as tmp:
        (tmp / "AUDIT.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["AUDIT.json"] and (out / "AUDIT.json").read_text() == "new"
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder holds nothing to lose: written without --overwrite
    with atomic_output_dir(empty, replaces=AUDIT_FILES) as tmp:
        (tmp / "AUDIT.md").write_text("x")
    assert (empty / "AUDIT.md").is_file()


def test_output_under_a_file(capsys, tmp_path, hf_dir, log_file):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    msg = f"cannot create this output folder: {blocker} is a file"
    cli_fails(capsys, ["eval", "--from-log", log_file, "--out", blocker / "eval"], msg, watch=tmp_path)
    cli_fails(capsys, ["convert", "hf-to-orbax", hf_dir, blocker / "ckpt"], msg, watch=tmp_path)
    cli_fails(capsys, ["convert", "orbax-to-hf", hf_dir, blocker / "hf"], msg, watch=tmp_path)
    cli_fails(capsys, ["eval", "--from-log", log_file, "--out", blocker], "notes.txt: is a file", watch=tmp_path)


@pytest.mark.parametrize("flags,fragment", [
    (["--max-new-tokens", "-1"], "--max-new-tokens -1: must be at least 1"),
    (["--limit", "0"], "--limit 0: must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
])
def test_eval_flags(capsys, tmp_path, hf_dir, flags, fragment):
    cli_fails(capsys, ["eval", hf_dir, "--out", tmp_path / "eval", *flags], fragment, watch=tmp_path)


@pytest.mark.parametrize("flags,fragment", [
    (["--temperature", "-0.5"], "--temperature=-0.5 is out of range: it must be >= 0"),
    (["--top-p", "0"], "--top-p=0.0 is out of range: it must be > 0 and <= 1"),
    (["--top-p", "1.5"], "--top-p=1.5 is out of range: it must be > 0 and <= 1"),
    (["--temperature", "nan"], "--temperature=nan is out of range"),
])
def test_audit_sampling_flags(capsys, tmp_path, hf_dir, flags, fragment):
    cli_fails(capsys, ["audit", "--models", f"m={hf_dir}", "--out", tmp_path / "audit", *flags], fragment,
              watch=tmp_path)


# -- Orbax: only our message -------------------------------------------------------------------------


def test_params_checkpoint_loads_without_absl_warnings(hf_dir, tmp_path, caplog):
    assert main(["convert", "hf-to-orbax", str(hf_dir), str(tmp_path / "ckpt")]) == 0
    caplog.clear()
    assert main(["convert", "orbax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "export")]) == 0
    assert "Metadata file does not exist" not in caplog.text


def test_resume_with_another_model_size_prints_only_the_message(tmp_path):
    """The error comes from the checkpoint's metadata, before Orbax starts reads that would fail
    (their background tasks would print tracebacks after the message, as the process exits)."""
    from tofu_fixture import make_mini_tofu, make_tiny_model_with_tokenizer

    from npo_jax.run_config import load_run_config
    from npo_jax.train import Trainer

    data = make_mini_tofu(tmp_path)
    small = make_tiny_model_with_tokenizer(tmp_path / "small", data, hidden=32)
    common = [f"data.dir={data}", f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}",
              "data.max_length=128", "data.length_buckets=[128]", "optim.effective_batch=8",
              "optim.per_device_batch=1", "optim.epochs=1", "checkpoint.export_hf=false"]
    Trainer(load_run_config(None, [f"model.path={small}", *common]), "unlearn", progress=False, max_steps=1).train()
    other = make_tiny_model_with_tokenizer(tmp_path / "other", data, hidden=64)
    (tmp_path / "run.yaml").write_text("seed: 0\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "npo_jax.cli", "unlearn", str(tmp_path / "run.yaml"),
                           f"model.path={other}", *common, "--resume"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"npo-jax: error: {tmp_path / 'run' / 'checkpoints' / '1'}: cannot restore the checkpoint: parameter "
        "'embed_tokens/embedding' was saved with shape [320, 32], this run's model has [320, 64] (a checkpoint of "
        "another model?)"], proc.stderr
