"""Every unlearning method against open-unlearning's own trainer: its `compute_loss` on a tiny HF
Llama, loss and every parameter gradient (float32, rtol 1e-4) on each device path training runs
(`method_parity`); and the `method` config section (per-method defaults, keys a method does not read)."""

import dataclasses
import types

import numpy as np
import pytest
from hf_models import make_hf_model, tiny_config
from method_parity import RTOL, grad_differences, grads_on, layout, open_unlearning, open_unlearning_trainers
from tofu_fixture import make_mini_tofu, make_tiny_model_with_tokenizer

import npo_jax.parity_run as parity_run
from npo_jax.data.batches import StepPlan, step_batch
from npo_jax.data.refusals import Refusals, load_refusals
from npo_jax.data.tokenize import IGNORE, ChatFormat, load_tokenizer
from npo_jax.errors import NpoJaxError
from npo_jax.losses import Objective
from npo_jax.methods.common import Scored
from npo_jax.run_config import load_run_config, to_yaml
from npo_jax.train import Trainer


@pytest.fixture(scope="module")
def ou_trainers():
    return open_unlearning_trainers()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    folder = make_hf_model(root / "m", tiny_config(tie=False, kv_heads=2, std=0.1))
    ref_folder = make_hf_model(root / "ref", tiny_config(tie=False, kv_heads=2, std=0.1), seed=1)
    return folder, ref_folder


CASES = [  # (method name, hyperparameters beyond the defaults)
    ("NPO", {"beta": 0.3, "alpha": 2.0, "gamma": 0.7, "retain_loss": "NLL", "reference": "live"}),
    ("NPO", {"beta": 0.3, "alpha": 2.0, "gamma": 0.7, "retain_loss": "KL", "reference": "live"}),
    ("SimNPO", {"beta": 0.5, "delta": 3.0, "alpha": 2.0, "gamma": 0.7, "retain_loss": "NLL"}),  # unsaturated
    ("SimNPO", {"beta": 1.5, "delta": 5.0, "alpha": 2.0, "gamma": 0.7, "retain_loss": "KL"}),
    ("GradAscent", {}),
    ("GradDiff", {"alpha": 2.0, "gamma": 0.7, "retain_loss": "NLL"}),
    ("GradDiff", {"alpha": 2.0, "gamma": 0.7, "retain_loss": "KL"}),
    ("DPO", {"beta": 0.3, "alpha": 2.0, "gamma": 0.7, "retain_loss": "NLL"}),
    ("DPO", {"beta": 0.3, "alpha": 2.0, "gamma": 0.7, "retain_loss": "KL"}),
    # the token weights p^beta are small on a random model: small exponents keep the forget term in play
    ("WGA", {"beta": 0.2, "alpha": 2.0, "gamma": 0.7, "retain_loss": "NLL"}),
    ("WGA", {"beta": 0.3, "alpha": 0.5, "gamma": 1.5, "retain_loss": "KL"}),
    ("SatImp", {"beta1": 0.2, "beta2": 1.5, "alpha": 2.0, "gamma": 0.7, "retain_loss": "NLL"}),
    ("SatImp", {"beta1": 0.1, "beta2": 1.0, "alpha": 0.3, "gamma": 1.5, "retain_loss": "KL"}),
    ("CEU", {"ignore_first_n_answer_tokens": 1}),
    ("CEU", {"ignore_first_n_answer_tokens": 3}),
    ("CEU", {"ignore_first_n_answer_tokens": 0}),
    # open-unlearning's two UNDIAL defects on (its defaults); off: tests/test_method_undial.py
    ("UNDIAL", {"beta": 10.0, "alpha": 0.5, "gamma": 1.0, "retain_loss": "NLL", "all_positions_mean": True,
                "wrapped_ignore_index": True}),
    ("UNDIAL", {"beta": 3.0, "alpha": 2.0, "gamma": 1.0, "retain_loss": "KL", "all_positions_mean": True,
                "wrapped_ignore_index": True}),
]
OURS_ONLY = ("reference", "all_positions_mean", "wrapped_ignore_index")  # keys open-unlearning's trainer lacks


IDS = [f"{n}-{h.get('retain_loss', h.get('ignore_first_n_answer_tokens', ''))}" for n, h in CASES]


# every case on one device; on each multi-device path each method once (a compile per case and
# path is most of this file's time), its retain terms split between the two paths
MULTI_DEVICE = {
    "sharded": ["NPO-NLL", "SimNPO-KL", "GradAscent-", "GradDiff-NLL", "DPO-KL", "WGA-NLL", "SatImp-KL", "CEU-1",
                "UNDIAL-NLL"],
    "pmap": ["NPO-KL", "SimNPO-NLL", "GradAscent-", "GradDiff-KL", "DPO-NLL", "WGA-KL", "SatImp-NLL", "CEU-3",
             "UNDIAL-KL"],
}
RUNS = [pytest.param(*case, path, id=f"{i}-{path}") for case, i in zip(CASES, IDS, strict=True)
        for path in ("single", "sharded", "pmap") if path == "single" or i in MULTI_DEVICE[path]]


def test_every_method_runs_on_every_path():
    methods = {name for name, _ in CASES}
    for path, ids in MULTI_DEVICE.items():
        assert set(ids) <= set(IDS) and {i.split("-")[0] for i in ids} == methods, path


@pytest.mark.parametrize("name,hparams,path", RUNS)
def test_loss_and_grads_match_open_unlearning_trainer(models, ou_trainers, name, hparams, path, capsys):
    """On one device, a data x fsdp x tensor mesh and pmap (`method_parity.LAYOUTS`), loss groups
    of 4 rows spanning devices and accumulation micro-batches (CE-U, which refuses that: 4 rows
    on each device), against the mean of open-unlearning's compute_loss over the groups."""
    folder, ref_folder = models
    obj = Objective(name, **hparams)
    cfg, host, loss, aux, grads = grads_on(layout(path, spanning=name != "CEU"), folder, ref_folder, obj)
    # the comparison covers the method's own term only if that term is not lost in the total
    assert abs(obj.gamma * aux["forget_loss"]) > 0.02 * abs(loss), aux
    ou_hparams = {k: v for k, v in hparams.items() if k not in OURS_ONLY}
    collate = ("forget",) if name == "UNDIAL" else ()  # exact for open-unlearning's own forget padding
    want, hf = open_unlearning(ou_trainers[name], ou_hparams, folder, ref_folder, host, collate=collate)
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    # CE-U's gradient is softmax(z) - q, two near-uniform distributions on a random model: its
    # entries cancel to float32 noise at ~5e-6 of the largest; the others' stay near 1e-6 on one
    # device and reach 1.4e-6 where a step sums 4-16 rows on several devices in another order
    floor = 1e-5 if name == "CEU" else 1e-6 if path == "single" else 2e-6
    worst = grad_differences(cfg, grads, hf, floor=floor)
    with capsys.disabled():
        print(f"\n{name} {hparams} {path}: loss {want:.6f}, rel diff {abs(loss - want) / abs(want):.2e}, "
              f"max grad rel diff {max(worst.values()):.2e}")


def test_ceu_refuses_a_loss_group_spanning_devices(models):
    with pytest.raises(NpoJaxError, match="optim.loss_group must not exceed optim.per_device_batch"):
        grads_on(layout("sharded"), *models, Objective("CEU"))


def _method(*overrides):
    return load_run_config(None, ["output_dir=x", "model.path=m", *overrides]).method


def test_unset_hyperparameters_take_the_methods_defaults():
    """open-unlearning's configs/trainer/*.yaml defaults: SimNPO's beta 4.5 and gamma 0.125."""
    m = _method("method.name=SimNPO")
    assert (m.beta, m.gamma, m.alpha, m.delta, m.retain_loss) == (4.5, 0.125, 1.0, 0.0, "NLL")
    assert _method("method.name=SimNPO", "method.beta=2").beta == 2.0
    m = _method()
    assert (m.name, m.beta, m.alpha, m.gamma, m.retain_loss, m.reference) == ("NPO", 0.1, 1.0, 1.0, "NLL", "cached")


@pytest.mark.parametrize("overrides,key", [
    (["method.name=NPO", "method.delta=0.5"], "method.delta"),
    (["method.name=GradAscent", "method.alpha=2"], "method.alpha"),
    (["method.name=SimNPO", "method.reference=live"], "method.reference"),
])
def test_a_key_the_method_does_not_read_is_an_error(overrides, key):
    with pytest.raises(NpoJaxError, match=f"{key} is not a hyperparameter of method.name="):
        _method(*overrides)


def test_dpo_needs_refusals_and_idkdpo_is_dpo():
    with pytest.raises(NpoJaxError, match="method.name=DPO needs data.idk_path"):
        _method("method.name=DPO")
    m = _method("method.name=IdkDPO", "data.idk_path=idk.jsonl")
    assert (m.beta, m.alpha, m.gamma, m.retain_loss) == (0.1, 1.0, 1.0, "NLL")
    assert Objective("IdkDPO").module is Objective("DPO").module
    with pytest.raises(NpoJaxError, match="method.reference is not a hyperparameter of method.name=DPO"):
        _method("method.name=DPO", "data.idk_path=idk.jsonl", "method.reference=live")


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    data = make_mini_tofu(root)
    (root / "idk.jsonl").write_text("I don't know.\n  That is beyond me.  \n\nNo idea, sorry.\n")
    return root, data, make_tiny_model_with_tokenizer(root, data)


def test_each_forget_item_gets_a_refusal_drawn_per_epoch(mini):
    """The "alternate" rows: each forget question with a refusal from data.idk_path, drawn anew
    for each epoch, the same on a rerun; padded like the rest of the step."""
    root, _, model = mini
    answers = load_refusals(root / "idk.jsonl")
    assert answers == ["I don't know.", "That is beyond me.", "No idea, sorry."]
    tok, fmt = load_tokenizer(model), ChatFormat()
    questions = [f"question {i}?" for i in range(40)]
    refusals = Refusals(questions, answers, tok, fmt, 128, seed=3)
    items, zeros = np.arange(40), np.zeros(40, np.int64)
    first, again = refusals.choice(items, zeros), refusals.choice(items, zeros)
    second = refusals.choice(items, zeros + 1)
    assert np.array_equal(first, again) and not np.array_equal(first, second) and set(first) == {0, 1, 2}
    forget = [ex for ex in Refusals(questions, ["a real answer"] * 3, tok, fmt, 128, 0).examples(items, zeros)]
    batch = step_batch(StepPlan(40, 8, 2, 0), 5, forget, buckets=[64, 128], pad_id=0, eot_id=None,
                       eot_mask_quirk=False, alternate=refusals)
    epochs, idx = StepPlan(40, 8, 2, 0).positions(5)
    want = refusals.examples(idx, epochs)
    assert batch["alternate"]["input_ids"].shape == batch["forget"]["input_ids"].shape
    for row, ex in enumerate(want):
        assert np.array_equal(batch["alternate"]["input_ids"][row, :len(ex.input_ids)], ex.input_ids)
        prompt = ex.labels == IGNORE
        assert np.array_equal(ex.input_ids[prompt], forget[idx[row]].input_ids[forget[idx[row]].labels == IGNORE])
    with pytest.raises(NpoJaxError, match="data.idk_path"):
        load_refusals(root / "missing.jsonl")


def test_dpo_run_trains_with_a_live_reference(mini, tmp_path):
    root, data, model = mini
    cfg = load_run_config(None, [
        f"model.path={model}", f"data.dir={data}", f"cache_dir={root}/cache", f"output_dir={tmp_path / 'out'}",
        "data.max_length=128", "data.length_buckets=[96,128]", "optim.effective_batch=8", "optim.per_device_batch=1",
        "optim.epochs=1", "checkpoint.export_hf=false", "method.name=DPO", f"data.idk_path={root / 'idk.jsonl'}"])
    trainer = Trainer(cfg, "unlearn", progress=False, max_steps=2)
    assert trainer.ref_params is not None and trainer.ref_logp is None
    epochs, idx = trainer.plan.positions(0)
    refusal_tokens = sum(len(e.input_ids) for e in trainer.data.refusals.examples(idx, epochs))
    forget_retain = dataclasses.replace(trainer.data, refusals=None).step_tokens(epochs, idx)
    assert trainer.data.step_tokens(epochs, idx) == forget_retain + refusal_tokens
    trainer.train()
    metrics = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2 and "nan" not in metrics[0].lower()


def test_ceu_refuses_a_loss_group_spanning_units():
    """The host's group token counts include the tokens CE-U leaves out: refused, naming the fields."""
    s = Scored({}, {}, {}, {}, units=1, span=2, token_logp={}, batch={}, per_token=None)
    with pytest.raises(NpoJaxError, match="optim.loss_group must not exceed optim.per_device_batch"):
        Objective("CEU").module.forget_loss(s, Objective("CEU"))


def test_parity_command_refuses_a_method_without_a_torch_objective(tmp_path):
    """`npo-jax parity` on a DPO run: a clear error, not a missing batch key deep in the check."""
    cfg = load_run_config(None, ["output_dir=x", "model.path=m", "method.name=DPO", "data.idk_path=idk.jsonl"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    args = types.SimpleNamespace(config=tmp_path / "config.yaml", items=3, batch_size=2, max_new_tokens=8,
                                 eot_mask_quirk=None)
    with pytest.raises(NpoJaxError, match="method.name=DPO has no objective check yet"):
        parity_run.load_settings(parity_run.Source(tmp_path, "hf"), args)
