"""The trainer end to end on a miniature TOFU: strategies agree, resume is exact, no recompiles,
run outputs, and bad input."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from tofu_fixture import make_mini_tofu, make_tiny_model_with_tokenizer, write_split

from npo_jax.cli import main
from npo_jax.data.batches import step_batch
from npo_jax.errors import NpoJaxError
from npo_jax.model import merge_params
from npo_jax.run_config import load_run_config
from npo_jax.train import Trainer
from npo_jax.train_step import CompiledStep


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    data = make_mini_tofu(root)
    model = make_tiny_model_with_tokenizer(root, data)
    return root, data, model


def _overrides(mini, out, *extra):
    root, data, model = mini
    return [f"model.path={model}", f"data.dir={data}", f"cache_dir={root}/cache", f"output_dir={out}",
            "data.max_length=128", "data.length_buckets=[96,128]", "optim.effective_batch=8",
            "optim.per_device_batch=1", "optim.epochs=3", "optim.lr=1e-3", "optim.warmup_epochs=0.5",
            "checkpoint.export_hf=false", *extra]


def _train(mini, out, *extra, mode="unlearn", max_steps=None, resume=False):
    cfg = load_run_config(None, _overrides(mini, out, *extra))
    trainer = Trainer(cfg, mode, resume=resume, progress=False, max_steps=max_steps)
    trainer.train()
    return trainer


def _losses(out, key="loss"):
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_strategies_give_the_same_trajectory(mini, tmp_path):
    assert jax.device_count() == 8
    runs = {
        "one_device": ["parallel.data=1"],
        "pmap8": ["parallel.strategy=pmap"],
        "data8": ["parallel.data=8"],
        "fsdp8": ["parallel.data=1", "parallel.fsdp=8"],
        "d2f2t2": ["parallel.data=2", "parallel.fsdp=2", "parallel.tensor=2"],
    }
    losses, params = {}, {}
    for name, extra in runs.items():
        trainer = _train(mini, tmp_path / name, *extra, max_steps=5)
        losses[name] = _losses(tmp_path / name)
        params[name] = trainer.params()
    assert len(losses["one_device"]) == 5
    assert np.ptp(losses["one_device"]) > 0.1  # the loss really moves
    for name in runs:
        np.testing.assert_allclose(losses[name], losses["one_device"], rtol=1e-4, err_msg=name)
        jax.tree.map(lambda a, b, n=name: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5, err_msg=n),
                     params[name], params["one_device"])


def test_loss_group_gives_the_same_trajectory_on_any_topology(mini, tmp_path):
    """optim.loss_group=2 (token means over groups of 2 examples): the same losses on one device with
    accumulation, fsdp=8, data=8 and pmap over 8, whether a device's rows hold a group
    (per_device_batch 2) or a group spans two devices or micro-batches (per_device_batch 1)."""
    runs = {
        "one_device": ["parallel.data=1"],
        "fsdp8": ["parallel.data=1", "parallel.fsdp=8"],
        "data8": ["parallel.data=8"],
        "pmap8": ["parallel.strategy=pmap"],
    }
    losses, retain = {}, {}
    for per_device_batch in (1, 2):
        common = ["optim.effective_batch=16", "optim.loss_group=2", f"optim.per_device_batch={per_device_batch}"]
        for name, extra in runs.items():
            out = tmp_path / f"{name}_{per_device_batch}"
            trainer = _train(mini, out, *common, *extra, max_steps=3)
            losses[out.name], retain[out.name] = _losses(out), _losses(out, "retain_loss")
            assert trainer.placement.span == 2 // per_device_batch
        info = json.loads((out / "run_info.json").read_text())
        assert info["loss_group"] == 2 and info["accumulation"] == 2 // per_device_batch  # on 8 devices
    reference = losses["one_device_1"]
    assert len(reference) == 3 and np.ptp(reference) > 0.05
    for name, trajectory in losses.items():
        np.testing.assert_allclose(trajectory, reference, rtol=1e-4, err_msg=name)
    # Without loss_group, per_device_batch 1 takes token means per example: another retain loss. On
    # this data (answers of similar lengths) the grouping moves it by about 1e-4 relative, so the
    # topologies must agree far closer than that for the test to tell groupings apart.
    _train(mini, tmp_path / "ungrouped", "optim.effective_batch=16", "parallel.data=1", max_steps=3)
    grouped = np.asarray(retain["one_device_1"])
    effect = np.abs(np.asarray(_losses(tmp_path / "ungrouped", "retain_loss")) - grouped).max() / grouped.max()
    spread = max(np.abs(np.asarray(r) - grouped).max() for r in retain.values()) / grouped.max()
    print(f"grouping effect {effect:.2e}, topology spread {spread:.2e}")
    assert effect > 10 * spread, (effect, spread)


def test_loss_groups_smaller_than_a_device_batch(mini, tmp_path):
    """loss_group 1 (a token mean per example): per_device_batch 2 puts two groups on each device
    (pmap: two units per device; sharded: 16 in the micro-batch), the same as one example at a time."""
    common = ["optim.effective_batch=16", "optim.loss_group=1"]
    runs = {"one_device": ["parallel.data=1", "optim.per_device_batch=1"],
            "pmap8": ["parallel.strategy=pmap", "optim.per_device_batch=2"],
            "data8": ["parallel.data=8", "optim.per_device_batch=2"]}
    losses = {}
    for name, extra in runs.items():
        trainer = _train(mini, tmp_path / name, *common, *extra, max_steps=2)
        losses[name] = _losses(tmp_path / name)
        assert trainer.placement.span == 1
    assert trainer.placement.units == 16
    for name in runs:
        np.testing.assert_allclose(losses[name], losses["one_device"], rtol=1e-4, err_msg=name)


def test_loss_group_must_divide_or_be_a_multiple_of_per_device_batch(mini, tmp_path):
    with pytest.raises(NpoJaxError, match="optim.loss_group=3 and optim.per_device_batch=2"):
        load_run_config(None, _overrides(mini, tmp_path, "optim.loss_group=3", "optim.per_device_batch=2"))
    with pytest.raises(NpoJaxError, match="not a multiple of optim.loss_group=16"):
        load_run_config(None, _overrides(mini, tmp_path, "optim.loss_group=16"))


def test_resume_continues_exactly(mini, tmp_path):
    straight = _train(mini, tmp_path / "straight", "checkpoint.every_steps=2")
    assert straight.total_steps == 6
    _train(mini, tmp_path / "split", "checkpoint.every_steps=2", max_steps=3)
    resumed = _train(mini, tmp_path / "split", "checkpoint.every_steps=2", resume=True)
    assert resumed.start_step == 3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), resumed.params(),
                 straight.params())
    np.testing.assert_allclose(_losses(tmp_path / "split"), _losses(tmp_path / "straight"), rtol=1e-6)


def test_stream_epochs_and_fresh_pairing_resume_exactly(mini, tmp_path):
    """optim.epoch_mode=stream with data.retain_pairing=fresh: 16 items in steps of 6 cross the
    epochs' ends; a run stopped and resumed reproduces the straight one (the pairing redrawn from the
    seed); a checkpoint is not resumed under another data order."""
    order = ["optim.effective_batch=6", "optim.epoch_mode=stream", "data.retain_pairing=fresh", "parallel.data=1",
             "checkpoint.every_steps=2"]
    straight = _train(mini, tmp_path / "straight", *order)
    assert straight.total_steps == 6 and straight.plan.mode == "stream"
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 0, 0, 1, 1, 1]  # step 3 takes epoch 0's last 4 and epoch 1's first 2
    epochs, items = straight.plan.positions(2)
    assert epochs.tolist() == [0] * 4 + [1] * 2
    batch = step_batch(straight.plan, 2, straight.data.examples, buckets=[96, 128], pad_id=straight.data.pad_id,
                       eot_id=straight.data.eot_id, eot_mask_quirk=False, retain=straight.data.retain,
                       pairing=straight.data.pairing)
    fresh = straight.data.pairing.partners(items, epochs)
    np.testing.assert_array_equal(batch["retain"]["input_ids"][:, :8],
                                  [np.pad(straight.data.retain[j].input_ids, (0, 128))[:8] for j in fresh])
    _train(mini, tmp_path / "split", *order, max_steps=3)
    with pytest.raises(NpoJaxError, match="optim.epoch_mode=stream, data.retain_pairing=fresh; this config has "
                                          "optim.epoch_mode=drop"):
        _train(mini, tmp_path / "split", *order, "optim.epoch_mode=drop", resume=True)
    resumed = _train(mini, tmp_path / "split", *order, resume=True)
    assert resumed.start_step == 3
    np.testing.assert_allclose(_losses(tmp_path / "split"), _losses(tmp_path / "straight"), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), resumed.params(),
                 straight.params())


def test_no_recompiles_after_first_step_of_each_bucket(mini, tmp_path):
    probe = load_run_config(None, _overrides(mini, tmp_path / "probe"))
    trainer = Trainer(probe, "unlearn", progress=False)
    lengths = sorted(len(e.input_ids) for e in trainer.data.examples + trainer.data.retain)
    cut = lengths[len(lengths) // 2]
    buckets = f"data.length_buckets=[{cut},128]"
    trainer = _train(mini, tmp_path / "run", buckets, "parallel.data=1")
    seen = set()
    for step in range(trainer.total_steps):
        b = step_batch(trainer.plan, step, trainer.data.examples, buckets=[cut, 128], pad_id=trainer.data.pad_id,
                       eot_id=trainer.data.eot_id, eot_mask_quirk=False, retain=trainer.data.retain,
                       pairing=trainer.data.pairing)
        seen.add((b["forget"]["input_ids"].shape[1], b["forget"]["label_positions"].shape[1]))
    assert trainer.total_steps > len(seen)
    assert len(trainer.step_fn.executables) == len(seen)


def test_compiled_step_one_executable_per_batch_shape_and_no_silent_recompile():
    step = CompiledStep(jax.jit(lambda state, ref, batch: (state + batch["x"].sum(), batch["x"].mean())))
    state = np.float32(1.0)
    for n in (4, 8, 4):
        state, mean = step(state, None, {"x": np.arange(n, dtype=np.float32)})
        assert float(mean) == (n - 1) / 2
    assert float(state) == 1 + 6 + 28 + 6
    step(state, None, {"x": np.arange(4, dtype=np.int32)})
    assert len(step.executables) == 3  # (4, float32), (8, float32), (4, int32)
    with pytest.raises(TypeError):  # a state unlike the one compiled for: an error, not a recompile
        step(np.zeros(2, np.float32), None, {"x": np.arange(4, dtype=np.float32)})


def test_run_outputs_and_export(mini, tmp_path):
    out = tmp_path / "run"
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("method:\n  name: NPO\n  alpha: 2.0\n")
    args = ["unlearn", str(cfg_file), *[o for o in _overrides(mini, out) if "export_hf" not in o],
            "checkpoint.export_hf=true", "parallel.data=1"]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for key in ("step", "loss", "forget_loss", "retain_loss", "lr", "grad_norm", "tokens_per_s"):
        assert key in records[0]
    assert records[0]["lr"] == 0.0 and records[1]["lr"] > 0  # warmup of int(0.5 * 16 // 8) = 1 step
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert "alpha: 2.0" in (out / "config.yaml").read_text()
    assert (out / "reference_logprobs.npy").is_file()
    # the exported HF folder loads in transformers and agrees with the trained params
    hf = transformers.LlamaForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    reloaded = Trainer(load_run_config(cfg_file, [*_overrides(mini, tmp_path / "x"), f"model.path={out}/checkpoints"]),
                       "unlearn", progress=False)
    ids = np.array([[1, 5, 9, 13, 17, 21]])
    ours = np.asarray(merge_params(reloaded.graphdef, reloaded.params())(ids))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_finetune_mode_lowers_the_loss(mini, tmp_path):
    _train(mini, tmp_path / "ft", "optim.lr=3e-3", "optim.epochs=4", "optim.warmup_epochs=0", mode="finetune")
    losses = _losses(tmp_path / "ft")
    assert len(losses) == 4 * 48 // 8 and losses[-1] < 0.7 * losses[0]


# -- bad input ------------------------------------------------------------------------------------------


def _expect_error(mini, tmp_path, fragment, *extra, data=None):
    overrides = _overrides(mini, tmp_path / "out", *extra)
    if data is not None:
        overrides = [o if not o.startswith("data.dir=") else f"data.dir={data}" for o in overrides]
    with pytest.raises(NpoJaxError) as err:
        Trainer(load_run_config(None, overrides), "unlearn", progress=False).train()
    assert fragment in str(err.value)


def test_bad_splits(mini, tmp_path):
    root, data, _ = mini
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("forget10", "retain90"):
        (bad / f"{name}.jsonl").write_bytes((data / f"{name}.jsonl").read_bytes())
    (bad / "forget10.jsonl").write_text("")
    _expect_error(mini, tmp_path, "empty split", data=bad)
    write_split(bad, "forget10", [{"question": "q only"}])
    _expect_error(mini, tmp_path, "record 1 has no field 'answer'", data=bad)
    (bad / "retain90.jsonl").unlink()
    write_split(bad, "forget10", [{"question": "q", "answer": "a"}] * 16)
    _expect_error(mini, tmp_path, "no retain90.json or retain90.jsonl", data=bad)


def test_batch_larger_than_dataset_and_existing_output(mini, tmp_path):
    _expect_error(mini, tmp_path, "effective batch 64 is larger than the dataset (16 examples)",
                  "optim.effective_batch=64")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    _expect_error(mini, tmp_path, "output folder exists")
    assert (tmp_path / "out" / "keep").read_text() == "x"


def test_tokenizer_without_chat_template(mini, tmp_path):
    root, _, model = mini
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tok / f).write_bytes((model / f).read_bytes())
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    _expect_error(mini, tmp_path, "has no chat template", f"model.tokenizer={tok}")


def test_unknown_config_key_lists_valid_keys():
    with pytest.raises(NpoJaxError) as err:
        load_run_config(None, ["output_dir=x", "model.path=y", "optim.learning_rate=1"])
    assert "unknown key 'optim.learning_rate'" in str(err.value) and "optim.lr" in str(err.value)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(mini, tmp_path):
    cache = tmp_path / "cache"
    _train(mini, tmp_path / "warm", f"cache_dir={cache}", max_steps=1)  # fills the reference cache
    (ref_file,) = (cache / "reference_logprobs").glob("*.npy")
    trainer = Trainer(load_run_config(None, _overrides(mini, tmp_path / "probe", f"cache_dir={cache}")), "unlearn",
                      progress=False)
    values = np.load(ref_file)
    values[trainer.plan.indices(1)[0]] = np.nan  # poison one item first seen in step 2
    np.save(ref_file, values)
    out = tmp_path / "run"
    with pytest.raises(NpoJaxError) as err:
        _train(mini, out, f"cache_dir={cache}", "checkpoint.every_steps=1")
    msg = str(err.value)
    assert "step 2: non-finite" in msg and "loss=nan" in msg and "last good checkpoint (step 1)" in msg
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [1]
    restored = Trainer(load_run_config(None, _overrides(mini, out, f"cache_dir={cache}")), "unlearn",
                       resume=True, progress=False)
    assert restored.start_step == 1
