"""PDU against open-unlearning's `trainer/unlearn/pdu.py`: loss and every parameter gradient of its
`compute_loss` (its unshifted forget logits; the shifted form against a torch formula), the dual
variable's trajectory over loss groups and steps (one device and pmap), its epoch-end update, and
the dual as train state: checkpointed, restored exactly on resume."""

import functools
import json
import sys

import jax
import numpy as np
import pytest
import test_methods
from hf_models import load_hf
from method_parity import _torch, examples
from method_parity import grad_differences as _grad_differences
from tofu_fixture import make_mini_tofu, make_tiny_model_with_tokenizer

from npo_jax.data.batches import label_width, pad_examples
from npo_jax.errors import NpoJaxError
from npo_jax.losses import Objective
from npo_jax.methods import pdu
from npo_jax.methods.common import UnitOrder
from npo_jax.model import abstract_model, split_params
from npo_jax.model_io import load_hf_params
from npo_jax.run_config import load_run_config
from npo_jax.train import Trainer
from npo_jax.train_step import accumulated_grads, make_retain_eval

RTOL = 1e-4
LENGTH = 24
models, ou_trainers = test_methods.models, test_methods.ou_trainers  # the fixtures, for pytest to find here


def _batch(seed, n):
    groups = {"forget": examples(seed, n), "retain": examples(seed + 1, n)}
    width = label_width(sum(groups.values(), []), LENGTH)
    return {k: pad_examples(v, LENGTH, pad_id=0, width=width) for k, v in groups.items()}


def _rows(batch, lo, hi):
    return {g: {k: v[lo:hi] for k, v in d.items()} for g, d in batch.items()}


def _ou_pdu(cls, obj: Objective, hf):
    """open-unlearning's PDU trainer without HF Trainer's setup: the attributes compute_loss reads."""
    t = cls.__new__(cls)
    t.gamma, t.alpha, t.retain_loss_type = obj.gamma, obj.alpha, obj.retain_loss
    t.preferences = [obj.gamma, obj.alpha]
    t.retain_loss_eps, t.primal_dual, t.dual_step_size = obj.retain_loss_eps, obj.primal_dual, obj.dual_step_size
    t.dual_update_upon, t.can_update = obj.dual_update_upon, obj.dual_warmup_epochs == 0
    t.loss_names, t.model, t.ref_model = ["forget_loss", "retain_loss"], hf, None
    t.logs = []
    t.log = t.logs.append
    return t


def _ou_loss(trainer, hf, batch):
    return trainer.compute_loss(hf, {k: _torch(v) for k, v in batch.items()})


@functools.cache
def _compiled(folder, obj, units):
    cfg, params = load_hf_params(folder)
    graphdef, _ = split_params(abstract_model(cfg))
    step = jax.jit(lambda p, b, s: accumulated_grads(graphdef, obj, p, None, b, units=units, method_state=s))
    return cfg, params, step


def _ours(folder, obj, batch, units=1, state=None):
    """(loss, aux, grads) of our step for `batch` ((accum, n, ...) or one micro-batch (n, ...)),
    from `state` (default: the method's initial state)."""
    cfg, params, step = _compiled(folder, obj, units)
    if batch["forget"]["input_ids"].ndim == 2:
        batch = jax.tree.map(lambda x: np.asarray(x)[None], batch)
    loss, aux, grads = step(params, batch, obj.initial_state() if state is None else state)
    return cfg, float(loss), aux, grads


def _shifted_torch_loss(hf, batch, obj):
    """The shifted forget term written independently: logits at t-1 score label t."""
    f = _torch(batch["forget"])
    logits = hf(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits[:, :-1]
    mask = (f["labels"][:, 1:] != -100).float()
    margin = (logits.max(-1).values - logits.mean(-1)) ** 2
    forget = (margin * mask).sum() / mask.sum()
    retain = hf(**_torch(batch["retain"])).loss
    return obj.gamma * forget + obj.alpha * (retain - obj.retain_loss_eps)


@pytest.mark.parametrize("quirk", [True, False])
def test_loss_and_grads_match_open_unlearning(models, ou_trainers, quirk, capsys):
    """Quirk on: open-unlearning's compute_loss; off: the shifted form, which open-unlearning's differs from."""
    folder, _ = models
    batch = _batch(0, 4)
    obj = Objective("PDU", alpha=0.2, gamma=0.7, retain_loss_eps=5.0, dual_warmup_epochs=0, logit_shift_quirk=quirk)
    hf = load_hf(folder)
    open_unlearning = _ou_loss(_ou_pdu(ou_trainers["PDU"], obj, hf), hf, batch)
    want = open_unlearning if quirk else _shifted_torch_loss(hf, batch, obj)
    want.backward()
    cfg, loss, aux, grads = _ours(folder, obj, batch)
    assert abs(obj.gamma * float(aux["forget_loss"])) > 0.05 * abs(loss), aux
    np.testing.assert_allclose(loss, want.item(), rtol=RTOL)
    if not quirk:
        assert abs(loss - open_unlearning.item()) > 1e-3 * abs(loss)
    worst = _grad_differences(cfg, grads, hf)
    with capsys.disabled():
        w = want.item()
        print(f"\nPDU quirk={quirk}: loss {w:.6f}, rel diff {abs(loss - w) / abs(w):.2e}, "
              f"max grad rel diff {max(worst.values()):.2e}")


def _dual_case(hf, batches, group):
    """eps the mean retain loss of the groups, so the dual goes both ways and hits 0."""
    r = [hf(**_torch(_rows(b, i, i + group)["retain"])).loss.item() for b in batches
         for i in range(0, len(b["retain"]["input_ids"]), group)]
    return Objective("PDU", alpha=0.05, gamma=1.0, retain_loss_eps=float(np.mean(r)), dual_step_size=2.0,
                     dual_warmup_epochs=0)


def test_dual_trajectory_matches_open_unlearning_per_loss_group(models, ou_trainers):
    """Two steps, each 2 accumulation micro-batches of 2 loss groups of 2 rows (params held): each
    group's loss uses the dual after the groups before it, as open-unlearning's compute_loss calls
    in data order; loss, gradients and the dual after each step agree."""
    folder, _ = models
    hf = load_hf(folder)
    steps = [_batch(10, 8), _batch(20, 8)]
    obj = _dual_case(hf, steps, 2)
    ou = _ou_pdu(ou_trainers["PDU"], obj, hf)
    state, seen = None, []
    for batch in steps:
        hf.zero_grad()
        losses = [_ou_loss(ou, hf, _rows(batch, i, i + 2)) for i in range(0, 8, 2)]
        (sum(losses) / 4).backward()
        seen += [log["retain_preference"] for log in ou.logs[-4:]]
        micro = jax.tree.map(lambda x: x.reshape(2, 4, *x.shape[1:]), batch)
        cfg, loss, aux, grads = _ours(folder, obj, micro, units=2, state=state)
        np.testing.assert_allclose(loss, (sum(losses) / 4).item(), rtol=RTOL)
        alpha = float(aux["method_state"]["retain_preference"])
        np.testing.assert_allclose(alpha, ou.preferences[1], rtol=1e-5, atol=1e-6)
        _grad_differences(cfg, grads, hf)
        state = aux["method_state"]
    assert min(seen) == 0.0 and max(seen) > 0.0, seen  # both branches of max(0, .) taken


def test_dual_under_pmap_equals_one_device(models):
    """Two devices holding one loss group each per micro-batch: the dual runs over the gathered
    groups in data order, as on one device."""
    folder, _ = models
    hf = load_hf(folder)
    batch = _batch(10, 8)
    obj = _dual_case(hf, [batch], 2)
    cfg, params = load_hf_params(folder)
    graphdef, _ = split_params(abstract_model(cfg))
    micro = jax.tree.map(lambda x: x.reshape(2, 4, *x.shape[1:]), batch)
    _, one_loss, one, _ = _ours(folder, obj, micro, units=2)
    per_device = jax.tree.map(lambda x: x.reshape(2, 2, 2, *x.shape[2:]).swapaxes(0, 1), micro)

    def f(b):
        loss, aux, _ = accumulated_grads(graphdef, obj, params, None, b, units=1, order=UnitOrder("d"))
        return jax.lax.pmean(loss, "d"), aux["method_state"]["retain_preference"]

    loss, alpha = jax.pmap(f, axis_name="d", devices=jax.devices()[:2])(per_device)
    np.testing.assert_allclose(np.asarray(loss), one_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(alpha), float(one["method_state"]["retain_preference"]), rtol=1e-5)


class _Epoch:
    def __init__(self, epoch):
        self.epoch = epoch


@pytest.mark.parametrize("warmup", [0, 2])
def test_epoch_update_matches_open_unlearning_callback(models, ou_trainers, warmup):
    """At each epoch end from the warmup on: alpha <- max(0, alpha + step (mean retain loss over the
    epoch's retain batches - eps)); our retain pass against open-unlearning's."""
    folder, _ = models
    hf = load_hf(folder)
    batches = [_batch(30, 4), _batch(40, 4)]
    for eps_shift, alpha in ((-0.5, 0.3), (0.5, 0.3)):  # the dual grows; it is clipped at 0
        base = _dual_case(hf, batches, 4)
        obj = base._replace(retain_loss_eps=base.retain_loss_eps + eps_shift, alpha=alpha, dual_update_upon="epoch",
                            dual_warmup_epochs=warmup)
        ou = _ou_pdu(ou_trainers["PDU"], obj, hf)
        ou.get_train_dataloader = lambda: [{k: _torch(v) for k, v in b.items()} for b in batches]
        cb = sys.modules[ou_trainers["PDU"].__module__].DualOptimizationCallback(ou, "epoch", warmup)
        cfg, params = load_hf_params(folder)
        graphdef, _ = split_params(abstract_model(cfg))
        retain_eval = make_retain_eval(graphdef, obj, units=1)
        state = jax.device_get(obj.initial_state())
        stacked = [jax.tree.map(lambda x: np.asarray(x)[None], b) for b in batches]
        retain_mean = lambda: float(np.mean([retain_eval(params, None, b) for b in stacked]))  # noqa: B023, E731
        for epoch in (1, 2, 3):
            cb.on_epoch_end(None, _Epoch(float(epoch)), None)
            state = pdu.epoch_end(obj, state, epoch, retain_mean)
            np.testing.assert_allclose(float(state["retain_preference"]), ou.preferences[1], rtol=1e-5, atol=1e-7)
            assert bool(state["dual_updates"]) == ou.can_update
        assert (ou.preferences[1] == 0.0) == (eps_shift > 0)


def test_retain_loss_eps_is_required_and_loss_names_checked():
    base = ["output_dir=x", "model.path=m", "method.name=PDU"]
    with pytest.raises(NpoJaxError, match="method.retain_loss_eps must be set for method.name=PDU"):
        load_run_config(None, base)
    m = load_run_config(None, [*base, "method.retain_loss_eps=0.3"]).method
    assert (m.primal_dual, m.dual_step_size, m.dual_update_upon, m.dual_warmup_epochs, m.gamma, m.alpha,
            m.retain_loss, m.logit_shift_quirk) == (True, 1.0, "step", 5, 1.0, 1.0, "NLL", True)
    with pytest.raises(NpoJaxError, match="method.loss_names"):
        load_run_config(None, [*base, "method.retain_loss_eps=0.3", "method.loss_names=[a]"])
    with pytest.raises(NpoJaxError, match="method.dual_update_upon"):
        load_run_config(None, [*base, "method.retain_loss_eps=0.3", "method.dual_update_upon=batch"])
    with pytest.raises(NpoJaxError, match="method.retain_loss_eps is not a hyperparameter of method.name=NPO"):
        load_run_config(None, ["output_dir=x", "model.path=m", "method.retain_loss_eps=0.3"])


def test_seed_config_loads():
    cfg = load_run_config("configs/unlearn/tofu_llama3.2_3b_pdu.yaml")
    assert cfg.method.name == "PDU" and cfg.method.retain_loss_eps == 0.3


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("pdu_mini")
    data = make_mini_tofu(root)
    return root, data, make_tiny_model_with_tokenizer(root, data)


def _trainer(mini, out, *extra, resume=False, max_steps=None):
    root, data, model = mini
    cfg = load_run_config(None, [
        f"model.path={model}", f"data.dir={data}", f"cache_dir={root}/cache", f"output_dir={out}",
        "data.max_length=128", "data.length_buckets=[96,128]", "optim.effective_batch=8", "optim.per_device_batch=1",
        "optim.epochs=2", "checkpoint.export_hf=false", "checkpoint.every_steps=1", "method.name=PDU",
        "method.retain_loss_eps=5.0", "method.alpha=0.5", "method.dual_step_size=0.5", *extra])
    return Trainer(cfg, "unlearn", resume=resume, progress=False, max_steps=max_steps)


def _duals(out):
    return [json.loads(line)["retain_preference"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dual_is_checkpointed_and_restored_exactly(mini, tmp_path):
    """Epoch updates (no warmup): the dual holds through epoch 1 and changes at each epoch end. A
    run stopped after step 3 (sharded) and resumed (pmap) restores the saved dual bit for bit and
    takes its step-4 record and epoch-2 update from it; the run exports as any other."""
    out = tmp_path / "run"
    first = _trainer(mini, out, "method.dual_update_upon=epoch", "method.dual_warmup_epochs=0", max_steps=3)
    first.train()
    saved = jax.device_get(first.state["method"])
    resumed = _trainer(mini, out, "method.dual_update_upon=epoch", "method.dual_warmup_epochs=0",
                       "parallel.strategy=pmap", "checkpoint.export_hf=true", resume=True)
    assert resumed.start_step == 3
    restored = jax.device_get(resumed.placement.host_state(resumed.state)["method"])
    assert all(np.array_equal(restored[k], saved[k]) for k in saved) and int(saved["dual_updates"]) == 1
    resumed.train()
    duals = _duals(out)
    assert duals[0] == duals[1] == 0.5 and duals[2] == duals[3] == float(saved["retain_preference"]) != 0.5, duals
    final = jax.device_get(resumed.placement.host_state(resumed.state)["method"])
    assert float(final["retain_preference"]) != duals[3]
    assert (out / "hf" / "config.json").is_file()  # the export reads the params alone, as for any method


def test_sharded_step_carries_the_dual_over_its_loss_groups(mini, tmp_path):
    """The jitted step on an 8-device mesh (8 loss groups of one row per micro-batch): its loss and
    dual equal the one-device computation on the same batch."""
    out = tmp_path / "run"
    trainer = _trainer(mini, out, "method.dual_warmup_epochs=0", max_steps=1)
    host, _ = trainer._host_batch(0)
    trainer.train()
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    _, params = load_hf_params(mini[2])
    obj = trainer.objective
    loss, aux, _ = jax.jit(lambda p, b: accumulated_grads(trainer.graphdef, obj, p, None, b, units=8))(params, host)
    np.testing.assert_allclose(record["loss"], float(loss), rtol=1e-5)
    np.testing.assert_allclose(record["retain_preference"], float(aux["method_state"]["retain_preference"]), rtol=1e-5)
    assert record["retain_preference"] != obj.alpha
