"""RMU against open-unlearning's trainer: its `compute_loss` on a tiny HF Llama (loss and every
parameter gradient, float32 rtol 1e-4; parameters torch leaves without a gradient are zero here),
the activation loss with and without open-unlearning's broadcast, the optimizer's update mask
against torch AdamW, the control vector, the config, and a short run."""

import json
import re
import sys
import types

import jax
import jax.extend
import numpy as np
import pytest
import test_methods
import torch
from hf_models import load_hf, make_hf_model, tiny_config
from method_parity import RTOL, _torch, examples
from method_parity import one_device as _ours
from transformers import get_linear_schedule_with_warmup

from npo_jax.data.batches import label_width, pad_examples
from npo_jax.errors import NpoJaxError
from npo_jax.losses import Objective
from npo_jax.methods import rmu
from npo_jax.model import abstract_model, split_params
from npo_jax.model_io import load_hf_params
from npo_jax.optim import make_optimizer
from npo_jax.params import param_specs
from npo_jax.run_config import load_run_config
from npo_jax.train import Trainer
from npo_jax.train_step import accumulated_grads
from npo_jax.tree_paths import get_path

ou_trainers, mini = test_methods.ou_trainers, test_methods.mini  # fixtures
LAYER = 1  # the middle one of the tiny model's 3 layers


@pytest.fixture(scope="module")
def rmu_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rmu")
    config = tiny_config(tie=False, kv_heads=2, std=0.1, layers=3)
    return make_hf_model(root / "m", config), make_hf_model(root / "ref", config, seed=1)


@pytest.fixture(scope="module")
def batch():
    groups = {"forget": examples(0, 4), "retain": examples(1, 4)}
    width = label_width(sum(groups.values(), []), 24)
    return {k: pad_examples(v, 24, pad_id=0, width=width) for k, v in groups.items()}


def _per_sequence(a1, a2, mask):
    """The activation loss as a per-sequence mean, written independently of open-unlearning's."""
    sq = ((a1 - a2) ** 2).mean(-1)
    return ((sq * mask).sum(1) / mask.sum(1)).mean()


def _ou_trainer(cls, hf, ref, vec, hparams, monkeypatch):
    """open-unlearning's RMU trainer without HF Trainer's setup: the attributes its __init__ sets."""
    trainer = cls.__new__(cls)
    trainer.model, trainer.ref_model = hf, ref
    trainer.gamma, trainer.alpha = hparams["gamma"], hparams["alpha"]
    trainer.retain_loss_type, trainer.steering_coeff = hparams["retain_loss"], 2.0
    ou_module = sys.modules[cls.__module__]
    monkeypatch.setattr(ou_module.deepspeed, "DeepSpeedEngine", type("NoEngine", (), {}), raising=False)
    regex = rf"model\.layers\.{LAYER}"
    trainer.model_module = trainer._get_matching_module(hf, regex)
    trainer.ref_module = trainer._get_matching_module(ref, regex)
    trainer.control_vec = torch.tensor(np.asarray(vec), dtype=torch.float32).reshape(1, 1, -1)
    if not hparams["rmu_broadcast_quirk"]:
        trainer.compute_activation_loss = _per_sequence
    return trainer


CASES = [
    {"retain_loss": "EMBED_DIFF", "rmu_broadcast_quirk": True, "alpha": 2.0, "gamma": 0.7},
    {"retain_loss": "EMBED_DIFF", "rmu_broadcast_quirk": False, "alpha": 2.0, "gamma": 0.7},
    {"retain_loss": "NLL", "rmu_broadcast_quirk": True, "alpha": 0.5, "gamma": 1.3},
    {"retain_loss": "NLL", "rmu_broadcast_quirk": False, "alpha": 0.5, "gamma": 1.3},
    {"retain_loss": "KL", "rmu_broadcast_quirk": True, "alpha": 2.0, "gamma": 0.7},
]


def _objective(cfg, hparams, steering=3.0):
    method = types.SimpleNamespace(control_vec_path=None, steering_coeff=steering)
    vec = rmu.control_vector(method, cfg.hidden_size, seed=0)
    return Objective("RMU", **hparams, rmu_layer=LAYER, control_vec=tuple(float(x) for x in vec)), vec


def _compare_grads(cfg, grads, hf):
    """Every HF parameter: ours equals torch's gradient; where torch has none (no path), ours is 0."""
    named, worst, none = dict(hf.named_parameters()), {}, []
    for spec in param_specs(cfg):
        ours = np.asarray(get_path(grads, spec.path))
        for i, name in enumerate(spec.hf_names(cfg.num_hidden_layers)):
            g = spec.to_hf(ours[i] if spec.stacked else ours)
            if named[name].grad is None:
                assert not np.any(g), name
                none.append(name)
                continue
            ref = named[name].grad.numpy()
            np.testing.assert_allclose(g, ref, rtol=RTOL, atol=1e-6 * np.abs(ref).max() + 1e-9, err_msg=name)
            worst[name] = float(np.abs(g - ref).max() / np.abs(ref).max())
    return worst, none


@pytest.mark.parametrize("hparams", CASES, ids=lambda h: f"{h['retain_loss']}-quirk{int(h['rmu_broadcast_quirk'])}")
def test_loss_and_grads_match_open_unlearning_trainer(rmu_models, ou_trainers, batch, hparams, monkeypatch, capsys):
    folder, ref_folder = rmu_models
    cfg, _ = load_hf_params(folder)
    obj, vec = _objective(cfg, hparams)
    hf, ref = load_hf(folder), load_hf(ref_folder)
    trainer = _ou_trainer(ou_trainers["RMU"], hf, ref, vec, hparams, monkeypatch)
    want = trainer.compute_loss(hf, {k: _torch(v) for k, v in batch.items()})
    want.backward()
    want = want.item()
    _, loss, grads = _ours(folder, ref_folder, obj, batch)
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    worst, none = _compare_grads(cfg, grads, hf)
    above = {f"model.layers.{LAYER + 1}.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"}
    assert above <= set(none) if hparams["retain_loss"] == "EMBED_DIFF" else not none
    with capsys.disabled():
        print(f"\nRMU {hparams}: loss {want:.6f}, rel diff {abs(loss - want) / abs(want):.2e}, "
              f"max grad rel diff {max(worst.values()):.2e}, {len(none)} tensors without a gradient")


def test_open_unlearnings_activation_loss_is_the_broadcast_form(ou_trainers):
    """Its reduction is mean(row sums) * mean(1 / row counts), which differs from the per-sequence
    mean when the rows' label counts differ; ours computes either."""
    rng = np.random.RandomState(0)
    a1, a2 = rng.randn(3, 5, 4).astype(np.float32), rng.randn(3, 5, 4).astype(np.float32)
    a1[0] *= 3  # the row with the most labels also has the largest differences
    labels = np.full((3, 5), -100)
    labels[0, 1:], labels[1, 3:], labels[2, 2:4] = 1, 1, 1
    mask = torch.tensor(labels != -100)
    ou = ou_trainers["RMU"].compute_activation_loss(None, torch.tensor(a1), torch.tensor(a2), mask).item()
    sq = ((a1 - a2) ** 2).mean(-1) * (labels != -100)
    counts = (labels != -100).sum(1)
    np.testing.assert_allclose(ou, sq.sum(1).mean() * (1 / counts).mean(), rtol=1e-6)
    per_seq = _per_sequence(torch.tensor(a1), torch.tensor(a2), mask).item()
    assert abs(ou - per_seq) > 0.05 * abs(per_seq)
    for quirk, want in ((True, ou), (False, per_seq)):
        got = rmu.activation_loss(a1, a2, labels, units=1, quirk=quirk)
        np.testing.assert_allclose(np.asarray(got), [want], rtol=1e-5)


def _hf_trainable(name, patterns):
    return any(re.fullmatch(p, name) for p in patterns)


@pytest.mark.parametrize("patterns", [[r"model\.layers\.(0|1)\.mlp\.down_proj\.weight"], [".*"]])
def test_update_mask_steps_match_torch_adamw(rmu_models, ou_trainers, batch, patterns, monkeypatch):
    """Three AdamW steps (HF's decay rule, clipping over every parameter with a gradient) on
    open-unlearning's loss: trained parameters equal torch's; the rest (not selected, or without a
    gradient path, as torch's AdamW skips them) stay bit-identical."""
    folder, ref_folder = rmu_models
    cfg, params = load_hf_params(folder)
    _, ref_params = load_hf_params(ref_folder)
    hparams = {"retain_loss": "EMBED_DIFF", "rmu_broadcast_quirk": True, "alpha": 1.0, "gamma": 1.0}
    obj, vec = _objective(cfg, hparams, steering=2.0)
    lr, steps = 1e-3, 3  # Adam moves every entry by about lr per step; atol 1e-5 is 1% of it
    mask = rmu.update_mask(cfg, patterns, "EMBED_DIFF", LAYER)
    tx, _ = make_optimizer(params, lr=lr, total_steps=10, warmup=1, weight_decay=0.01, max_grad_norm=1.0,
                           update_mask=mask)
    graphdef, _ = split_params(abstract_model(cfg))
    stacked = jax.tree.map(lambda x: np.asarray(x)[None], batch)

    @jax.jit
    def step(p, state):
        _, _, grads = accumulated_grads(graphdef, obj, p, ref_params, stacked, units=1)
        updates, state = tx.update(grads, state, p)
        return jax.tree.map(lambda a, u: a + u, p, updates), state

    ours, state = params, tx.init(params)
    for _ in range(steps + 1):  # the first update has lr 0 (HF's warmup)
        ours, state = step(ours, state)

    hf, ref = load_hf(folder), load_hf(ref_folder)
    trainer = _ou_trainer(ou_trainers["RMU"], hf, ref, vec, hparams, monkeypatch)
    chosen = [(n, p) for n, p in hf.named_parameters() if _hf_trainable(n, patterns)]
    groups = [{"params": [p for n, p in chosen if "norm" not in n], "weight_decay": 0.01},
              {"params": [p for n, p in chosen if "norm" in n], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    sched = get_linear_schedule_with_warmup(opt, 1, 10)
    inputs = {k: _torch(v) for k, v in batch.items()}
    for _ in range(steps + 1):
        hf.zero_grad(set_to_none=True)  # HF Trainer zeroes every parameter's gradient, trained or not
        trainer.compute_loss(hf, inputs).backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        sched.step()

    named, changed, kept = dict(hf.named_parameters()), 0, 0
    for spec in param_specs(cfg):
        start, end = np.asarray(get_path(params, spec.path)), np.asarray(get_path(ours, spec.path))
        for i, name in enumerate(spec.hf_names(cfg.num_hidden_layers)):
            a, b = (start[i], end[i]) if spec.stacked else (start, end)
            np.testing.assert_allclose(spec.to_hf(b), named[name].detach().numpy(), atol=1e-5, rtol=0, err_msg=name)
            trained = _hf_trainable(name, patterns) and ("layers" not in name or int(name.split(".")[2]) <= LAYER) \
                and name not in ("model.norm.weight", "lm_head.weight")
            if trained:
                assert np.abs(b - a).max() > lr, name
                changed += 1
            else:
                assert np.array_equal(a, b), name  # bit-identical
                kept += 1
    assert changed and kept


def test_control_vector_from_the_seed_or_a_file(tmp_path):
    method = types.SimpleNamespace(control_vec_path=None, steering_coeff=2.0)
    vec = rmu.control_vector(method, 16, seed=3)
    assert vec.shape == (16,) and np.all(vec >= 0)
    np.testing.assert_allclose(np.linalg.norm(vec), 2.0, rtol=1e-6)
    assert np.array_equal(vec, rmu.control_vector(method, 16, seed=3))
    assert not np.array_equal(vec, rmu.control_vector(method, 16, seed=4))
    (tmp_path / "c.json").write_text(json.dumps(vec.tolist()))
    np.save(tmp_path / "c.npy", vec.reshape(1, 1, 16))  # get_control_vector's own shape
    for name in ("c.json", "c.npy"):
        method.control_vec_path = str(tmp_path / name)
        assert np.array_equal(rmu.control_vector(method, 16, seed=0), vec)
    (tmp_path / "bad.json").write_text("[1, 2")
    (tmp_path / "nan.json").write_text("[1, NaN]")
    for name, size in (("c.json", 8), ("bad.json", 2), ("nan.json", 2), ("missing.npy", 16), ("c.txt", 16)):
        with pytest.raises(NpoJaxError, match=rf"method.control_vec_path={re.escape(str(tmp_path / name))}.*"
                                              rf"hidden_size={size}"):
            rmu.read_control_vec(tmp_path / name, size)


def test_module_regex_and_trainable_params_regex_errors(rmu_models):
    cfg, _ = load_hf_params(rmu_models[0])
    assert rmu.layer_index(r"model\.layers\.2", cfg) == 2
    for regex, why in ((r"model\.layers\.\d", "matched"), (r"model\.layers\.7", "none"),
                       (r"model\.layers\.1\.mlp", "one decoder layer"), ("(", "not a regular expression")):
        with pytest.raises(NpoJaxError, match=f"method.module_regex.*{why}"):
            rmu.layer_index(regex, cfg)
    with pytest.raises(NpoJaxError, match="method.trainable_params_regex.*selects no parameter"):
        rmu.update_mask(cfg, [r"model\.layers\.9\..*"], "NLL", LAYER)
    with pytest.raises(NpoJaxError, match=r"config: method.trainable_params_regex: '\[' is not a regular expression"):
        load_run_config(None, ["output_dir=x", "model.path=m", "method.name=RMU",
                               "method.trainable_params_regex=['[']"])
    with pytest.raises(NpoJaxError, match="method.retain_loss=EMBED_DIFF is not a retain loss of method.name=NPO"):
        load_run_config(None, ["output_dir=x", "model.path=m", "method.retain_loss=EMBED_DIFF"])


def test_config_defaults_are_open_unlearnings():
    m = load_run_config(None, ["output_dir=x", "model.path=m", "method.name=RMU"]).method
    assert (m.gamma, m.alpha, m.steering_coeff, m.retain_loss, m.module_regex, m.trainable_params_regex) == (
        1.0, 1.0, 2.0, "EMBED_DIFF", r"model\.layers\.7", [".*"])
    assert m.rmu_broadcast_quirk and m.control_vec_path is None
    cfg = load_run_config("configs/unlearn/tofu_llama3.2_3b_rmu.yaml")
    assert (cfg.method.name, cfg.method.module_regex, cfg.optim.loss_group) == ("RMU", r"model\.layers\.7", 4)
    with pytest.raises(NpoJaxError, match="method.steering_coeff is not a hyperparameter of method.name=NPO"):
        load_run_config(None, ["output_dir=x", "model.path=m", "method.steering_coeff=5"])


def _short_run(mini, out, strategy):
    root, data, model = mini
    cfg = load_run_config(None, [
        f"model.path={model}", f"data.dir={data}", f"cache_dir={root}/cache", f"output_dir={out}",
        "data.max_length=128", "data.length_buckets=[96,128]", "optim.effective_batch=8", "optim.per_device_batch=1",
        "optim.epochs=1", "checkpoint.export_hf=false", "method.name=RMU", r"method.module_regex=model\.layers\.0",
        f"parallel.strategy={strategy}"])
    trainer = Trainer(cfg, "unlearn", progress=False, max_steps=2)
    assert trainer.ref_params is not None and trainer.objective.rmu_layer == 0
    start = jax.device_get(trainer.params())
    trainer.train()
    return trainer, start, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rmu_runs_sharded_and_pmap_alike_and_keep_their_control_vector(mini, tmp_path):
    """Two steps on 8 devices each way: the same losses; the run folder keeps the control vector;
    with EMBED_DIFF on layer 0 the final norm and the layers above stay unchanged."""
    runs = {s: _short_run(mini, tmp_path / s, s) for s in ("sharded", "pmap")}
    for strategy, (trainer, start, metrics) in runs.items():
        assert len(metrics) == 2 and all(np.isfinite(m["loss"]) and m["forget_loss"] > 0 for m in metrics)
        saved = np.load(tmp_path / strategy / rmu.CONTROL_VEC_FILE)
        np.testing.assert_array_equal(saved, np.asarray(trainer.objective.control_vec, np.float32))
        end = trainer.params()
        assert np.array_equal(start["norm"]["scale"], end["norm"]["scale"])  # no gradient path with EMBED_DIFF
        before, after = (p["layers"]["mlp"]["down_proj"]["kernel"] for p in (start, end))
        assert np.array_equal(before[1:], after[1:]) and not np.array_equal(before[0], after[0])
    for key in ("loss", "forget_loss", "retain_loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in runs["pmap"][2]], [m[key] for m in runs["sharded"][2]],
                                   rtol=1e-5, err_msg=key)


def test_broadcast_form_refuses_a_loss_group_spanning_units():
    """mean(1 / counts) over a group spread over several units is not computed on the host: refused,
    naming the fields; the per-sequence mean is a mean over rows, exact on any split."""
    obj = Objective("RMU", rmu_layer=0, control_vec=(1.0,))
    with pytest.raises(NpoJaxError, match="rmu_broadcast_quirk=true: optim.loss_group must not exceed"):
        rmu.objective(None, None, {"forget": {}, "retain": {}}, obj, units=1, span=2)


def _scan_lengths(jaxpr) -> list[int]:
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            out.append(eqn.params["length"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _scan_lengths(sub)
    return out


def test_embed_diff_runs_only_the_layers_up_to_the_steered_one(rmu_models, batch):
    """With EMBED_DIFF the loss and its gradient scan over layers 0..k only (the model's scan is not
    unrolled, and nothing above layer k is computed), for the model and the reference alike; the
    NLL retain term scans all layers (for the retain rows)."""
    folder, ref_folder = rmu_models
    cfg, params = load_hf_params(folder)
    _, ref_params = load_hf_params(ref_folder)
    graphdef, _ = split_params(abstract_model(cfg))
    stacked = jax.tree.map(lambda x: np.asarray(x)[None], batch)
    found = {}
    for case in (CASES[0], CASES[2]):
        obj, _ = _objective(cfg, case)
        jaxpr = jax.make_jaxpr(lambda p, r, o=obj: accumulated_grads(graphdef, o, p, r, stacked, units=1))
        lengths = _scan_lengths(jaxpr(params, ref_params).jaxpr)
        found[case["retain_loss"]] = {n for n in lengths if n != 1}  # 1: the scan over the one micro-batch
    assert found["EMBED_DIFF"] == {LAYER + 1} and cfg.num_hidden_layers > LAYER + 1
    assert {LAYER + 1, cfg.num_hidden_layers} <= found["NLL"]
