"""HF -> Orbax -> HF round trips, training-checkpoint export and sharded loading."""

import json

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from hf_models import make_hf_model, tiny_config
from safetensors import safe_open

from npo_jax.checkpoint import ParamsReader, copy_side_files
from npo_jax.cli import main
from npo_jax.model import abstract_model, merge_params, split_params
from npo_jax.model_io import load_hf_params
from npo_jax.sharding import make_mesh, param_partition_specs, param_shardings


def read_all_tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="np") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def write_fake_tokenizer(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))


@pytest.mark.parametrize("dtype,dialect,tie", [(torch.bfloat16, "4", True), (torch.float32, "5", False)],
                         ids=["bf16-v4-tied", "fp32-v5-untied"])
def test_round_trip_is_bit_identical(tmp_path, dtype, dialect, tie):
    src = make_hf_model(tmp_path / "hf", tiny_config(tie=tie, std=0.1), dtype=dtype, dialect=dialect,
                        max_shard_size="60KB")
    write_fake_tokenizer(src)
    assert len(list(src.glob("*.safetensors"))) > 1  # sharded like the release
    assert main(["convert", "hf-to-orbax", str(src), str(tmp_path / "ckpt")]) == 0
    assert main(["convert", "orbax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"),
                 "--max-shard-size", "100KB"]) == 0
    out = tmp_path / "out"

    a, b = read_all_tensors(src), read_all_tensors(out)
    assert sorted(a) == sorted(b)
    assert ("lm_head.weight" in b) == (not tie)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].tobytes() == b[name].tobytes(), name
    assert json.loads((src / "config.json").read_text()) == json.loads((out / "config.json").read_text())
    assert (out / "tokenizer_config.json").read_text() == (src / "tokenizer_config.json").read_text()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b) and len(set(index["weight_map"].values())) > 1
    for name, shard in index["weight_map"].items():
        with safe_open(str(out / shard), framework="np") as f:
            assert name in f.keys()

    # transformers loads the export with nothing missing or unexpected, and agrees with our model
    hf, info = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reader = ParamsReader(tmp_path / "ckpt")
    params = reader.read_all()
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(params))
    graphdef, _ = split_params(abstract_model(reader.config))
    ids = np.random.RandomState(0).randint(4, 256, (2, 10))
    ours = np.asarray(merge_params(graphdef, params)(ids))
    with torch.no_grad():
        ref = hf.eval()(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_dtype_options_and_dialect_written_back(tmp_path):
    src = make_hf_model(tmp_path / "hf", tiny_config(), dtype=torch.float32, dialect="4")
    assert main(["convert", "hf-to-orbax", str(src), str(tmp_path / "ckpt"), "--dtype", "bfloat16"]) == 0
    reader = ParamsReader(tmp_path / "ckpt")
    assert reader.dtype(("layers", "mlp", "up_proj", "kernel")) == np.dtype(ml_dtypes.bfloat16)
    assert main(["convert", "orbax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["torch_dtype"] == "bfloat16" and "rope_scaling" in raw and "rope_parameters" not in raw
    assert "dtype" not in raw
    tensors = read_all_tensors(tmp_path / "out")
    assert all(t.dtype == np.dtype(ml_dtypes.bfloat16) for t in tensors.values())
    ref = read_all_tensors(src)
    for name, t in tensors.items():  # fp32 -> bf16 rounds exactly as ml_dtypes (round to nearest even)
        assert t.tobytes() == ref[name].astype(ml_dtypes.bfloat16).tobytes(), name


def test_export_from_training_checkpoint_reads_params_only(tmp_path):
    src = make_hf_model(tmp_path / "hf", tiny_config(), dtype=torch.float32)
    cfg, params = load_hf_params(src)
    run = tmp_path / "run"
    manager = ocp.CheckpointManager(run.absolute(), item_names=("state",))
    for step in (1, 2):
        scaled = jax.tree.map(lambda x, s=step: x * s, params)
        state = {"params": scaled, "opt_state": {"mu": jax.tree.map(np.zeros_like, params)},
                 "step": np.int64(step)}
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
    copy_side_files(src, run)
    write_fake_tokenizer(tmp_path / "tok")
    assert main(["convert", "orbax-to-hf", str(run), str(tmp_path / "out"), "--tokenizer-from",
                 str(tmp_path / "tok")]) == 0
    out = read_all_tensors(tmp_path / "out")
    ref = read_all_tensors(src)
    for name in ref:  # newest step (2) is exported
        np.testing.assert_array_equal(out[name], ref[name] * 2)
    assert (tmp_path / "out" / "special_tokens_map.json").is_file()


@pytest.mark.parametrize("axes", [dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)], ids=["fsdp8", "d2f2t2"])
def test_load_onto_mesh(tmp_path, axes):
    assert jax.device_count() == 8
    src = make_hf_model(tmp_path / "hf", tiny_config(tie=False, kv_heads=2), dtype=torch.float32)
    cfg, host = load_hf_params(src)
    mesh = make_mesh(**axes)
    shardings = param_shardings(cfg, mesh)
    _, placed = load_hf_params(src, shardings=shardings)
    specs = param_partition_specs(cfg, mesh)
    q = placed["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == specs["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec[1] == "fsdp" and q.sharding.spec[2] == "tensor"
    # each device holds only its block: q_proj (layers, 64, 64) split over fsdp x tensor
    block = q.addressable_shards[0].data.shape
    assert block == (cfg.num_hidden_layers, 64 // axes.get("fsdp", 1), 64 // axes.get("tensor", 1))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), placed, host)

    # a sharded conversion writes the same checkpoint, and a restore lands on the same shardings
    mesh_arg = ",".join(f"{k}={v}" for k, v in axes.items())
    assert main(["convert", "hf-to-orbax", str(src), str(tmp_path / "ckpt"), "--mesh", mesh_arg]) == 0
    restored = ParamsReader(tmp_path / "ckpt").read_all(shardings)
    assert restored["lm_head"]["kernel"].sharding == shardings["lm_head"]["kernel"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored, host)
