"""UNDIAL against open-unlearning's trainer (its `compute_loss` on a tiny HF Llama, its forget
micro-batch padded to its longest row as its collator does, ours to a longer bucket) with its two
defects on, and against an independent PyTorch formula with them off; loss groups spanning
units; the config; a short run on the sharded mesh and under pmap."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hf_models import load_hf
from method_parity import _torch, examples
from method_parity import grad_differences as _grad_differences
from method_parity import one_device as _ours
from method_parity import open_unlearning_on_batch as _open_unlearning
from test_methods import mini, models, ou_trainers

from npo_jax import logprobs
from npo_jax.data.batches import group_lengths, group_tokens, label_width, pad_examples
from npo_jax.errors import NpoJaxError
from npo_jax.losses import Objective
from npo_jax.methods.undial import row_lengths
from npo_jax.model import abstract_model, split_params
from npo_jax.model_io import load_hf_params
from npo_jax.run_config import load_run_config
from npo_jax.train import Trainer
from npo_jax.train_step import accumulated_grads

__all__ = ["mini", "models", "ou_trainers"]  # fixtures, used by name
RTOL = 1e-4
CONFIG = Path(__file__).resolve().parents[1] / "configs/unlearn/tofu_llama3.2_3b_undial.yaml"


def _batches(length, retain_length=None):
    """(ours: every group padded to `length`; open-unlearning's: forget padded to its longest
    row, retain to `retain_length` or its longest)."""
    groups = {"forget": examples(0, 4), "retain": examples(1, 4)}
    width = label_width(sum(groups.values(), []), length)
    ours = {k: pad_examples(v, length, pad_id=0, width=width) for k, v in groups.items()}
    longest = {k: max(len(e.input_ids) for e in v) for k, v in groups.items()}
    longest["retain"] = retain_length or longest["retain"]
    assert longest["forget"] < length  # the padding differs
    return ours, {k: pad_examples(v, longest[k], pad_id=0) for k, v in groups.items()}


def _chunk_logits(monkeypatch) -> list:
    """The large-vocabulary path: LM heads a chunk of 4 positions at a time under jax.checkpoint
    (the last chunk padded); returns the list of chunk lengths the chunked calls ran with."""
    monkeypatch.setattr(logprobs, "LOGITS_BUDGET_BYTES", 4 * 4 * 256 * 4)
    monkeypatch.setattr(logprobs, "CHUNK_POSITIONS", 4)
    chunks, real_map = [], jax.lax.map
    monkeypatch.setattr(jax.lax, "map", lambda f, xs, **kw: chunks.append(xs[0].shape[2]) or real_map(f, xs, **kw))
    return chunks


def _torch_undial(hf, ref, batch, beta, alpha, gamma, all_positions, wrapped):
    """UNDIAL from its definition, written independently of open-unlearning's code: the forget
    group's mean over every position t < L-1 (`all_positions`) or over its labelled positions;
    `wrapped`: where unlabelled, the teacher's logit of token vocab - 100 lowered by beta."""
    forget = _torch(batch["forget"])
    inputs = {k: forget[k] for k in ("input_ids", "attention_mask")}
    logp = F.log_softmax(hf(**inputs).logits[:, :-1].float(), -1)
    with torch.no_grad():
        teacher = ref(**inputs).logits[:, :-1].float().clone()
    target = forget["labels"][:, 1:]
    labelled = target != -100
    rows, cols = torch.nonzero(labelled, as_tuple=True)
    teacher[rows, cols, target[rows, cols]] -= beta
    if wrapped:
        teacher[:, :, teacher.shape[-1] - 100] -= beta * (~labelled).float()
    ce = -(teacher.softmax(-1) * logp).sum(-1)
    forget_loss = ce.mean() if all_positions else ce[labelled].mean()
    retain_loss = hf(**_torch(batch["retain"])).loss
    loss = gamma * forget_loss + alpha * retain_loss
    loss.backward()
    return loss.item()


CASES = [  # (hyperparameters, our padded length, LM heads in chunks)
    ({"beta": 10.0, "alpha": 2.0, "gamma": 0.7, "retain_loss": "NLL"}, 24, False),
    ({"beta": 30.0, "alpha": 0.5, "gamma": 1.5, "retain_loss": "KL"}, 32, True),
]


@pytest.mark.parametrize("hparams,length,chunked", CASES,
                         ids=[f"{h['retain_loss']}-beta{h['beta']:g}-L{n}{'-chunked' * c}" for h, n, c in CASES])
def test_loss_and_grads_match_open_unlearning_trainer(models, ou_trainers, hparams, length, chunked, monkeypatch,
                                                      capsys):
    """Defects on: our longer padding gives open-unlearning's value for its own shorter padding.
    Retain KL (`batchmean` over every position) sees the padded length: open-unlearning's retain
    rows are padded like ours there, its forget rows to their longest."""
    folder, ref_folder = models
    ours, theirs = _batches(length, retain_length=length if hparams["retain_loss"] == "KL" else None)
    hf, ref = load_hf(folder), load_hf(ref_folder)
    want = _open_unlearning(ou_trainers["UNDIAL"], hparams, hf, ref, theirs)
    obj = Objective("UNDIAL", **hparams, all_positions_mean=True, wrapped_ignore_index=True)
    chunks = _chunk_logits(monkeypatch) if chunked else []
    cfg, loss, grads = _ours(folder, ref_folder, obj, ours)
    assert (4 in chunks) == chunked
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    worst = _grad_differences(cfg, grads, hf)
    with capsys.disabled():
        print(f"\nUNDIAL {hparams} L={length}: loss {want:.6f}, rel diff {abs(loss - want) / abs(want):.2e}, "
              f"max grad rel diff {max(worst.values()):.2e}")


@pytest.mark.parametrize("all_positions,wrapped,chunked", [(False, False, True), (True, False, False),
                                                           (True, True, False)])
def test_loss_and_grads_match_an_independent_formula(models, all_positions, wrapped, chunked, monkeypatch):
    """Each flag against the definition; with both off, the token mean over labelled positions,
    which no padding changes (here with the LM heads in chunks)."""
    folder, ref_folder = models
    chunks = _chunk_logits(monkeypatch) if chunked else []
    ours, theirs = _batches(32)
    hparams = {"beta": 10.0, "alpha": 0.5, "gamma": 1.0}
    hf, ref = load_hf(folder), load_hf(ref_folder)
    want = _torch_undial(hf, ref, theirs, **hparams, all_positions=all_positions, wrapped=wrapped)
    obj = Objective("UNDIAL", **hparams, all_positions_mean=all_positions, wrapped_ignore_index=wrapped)
    cfg, loss, grads = _ours(folder, ref_folder, obj, ours)
    assert (4 in chunks) == chunked
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    _grad_differences(cfg, grads, hf)


def test_each_flag_changes_what_the_tests_compare(models):
    """On this batch the all-positions mean moves the loss, and the vocab-100 penalty the
    gradient of that token's LM-head row, far beyond the tolerances above."""
    folder, ref_folder = models
    _, theirs = _batches(32)
    loss, row = {}, {}
    for flags in ((False, False), (True, False), (True, True)):
        hf, ref = load_hf(folder), load_hf(ref_folder)
        loss[flags] = _torch_undial(hf, ref, theirs, 10.0, 0.0, 1.0, *flags)
        row[flags] = hf.lm_head.weight.grad[hf.config.vocab_size - 100].clone()
    assert abs(loss[True, False] - loss[False, False]) > 10 * RTOL * loss[False, False], loss
    change = (row[True, True] - row[True, False]).abs().max() / row[True, False].abs().max()
    assert change > 0.1, change


@pytest.mark.parametrize("all_positions", [True, False])
def test_loss_group_spanning_units_is_exact(models, all_positions):
    """One loss group of 4 rows over 2 accumulation micro-batches (span 2, the group's length and
    token count from the host) gives the loss and gradients of the group in one micro-batch."""
    folder, _ = models
    ours, _ = _batches(24)
    cfg, params = load_hf_params(folder)
    graphdef, _ = split_params(abstract_model(cfg))
    _, ref_params = load_hf_params(models[1])
    obj = Objective("UNDIAL", beta=10.0, alpha=0.5, all_positions_mean=all_positions)
    whole = accumulated_grads(graphdef, obj, params, ref_params, jax.tree.map(lambda x: x[None], ours), units=1)
    ex = {"forget": examples(0, 4), "retain": examples(1, 4)}
    step = {k: {**v, "group_tokens": group_tokens(ex[k], 24, 4)} for k, v in ours.items()}
    step["forget"]["group_length"] = group_lengths(ex["forget"], 24, 4)
    parts = jax.tree.map(lambda x: np.asarray(x).reshape(2, 2, *x.shape[1:]), step)
    loss, aux, grads = accumulated_grads(graphdef, obj, params, ref_params, parts, units=1, span=2)
    np.testing.assert_allclose(float(loss), float(whole[0]), rtol=1e-5)
    np.testing.assert_allclose(float(aux["forget_loss"]), float(whole[1]["forget_loss"]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max()),
                 grads, whole[2])
    if all_positions:
        del parts["forget"]["group_length"]
        with pytest.raises(NpoJaxError, match="group_length"):
            accumulated_grads(graphdef, obj, params, ref_params, parts, units=1, span=2)


@pytest.mark.parametrize("quirk", [False, True])
def test_row_lengths_are_the_unpadded_lengths(quirk):
    """The device's row lengths (span 1) are the examples' lengths under either mask convention
    (open-unlearning's hides the closing <|eot_id|>, which is the pad id too)."""
    ex = examples(3, 6)
    for e in ex:
        e.input_ids[-1] = 2  # the closing eot
    batch = pad_examples(ex, 20, pad_id=2, eot_id=2, eot_mask_quirk=quirk)
    assert np.array_equal(np.asarray(row_lengths(batch)), [len(e.input_ids) for e in ex])
    assert np.array_equal(group_lengths(ex, 20, 3), np.repeat([max(len(e.input_ids) for e in ex[i:i + 3])
                                                                 for i in (0, 3)], 3))


def test_config_defaults_and_the_seed_config():
    m = load_run_config(None, ["output_dir=x", "model.path=m", "method.name=UNDIAL"]).method
    assert (m.beta, m.gamma, m.alpha, m.retain_loss, m.all_positions_mean, m.wrapped_ignore_index) == \
        (10.0, 1.0, 0.0, "NLL", True, True)
    cfg = load_run_config(CONFIG, ["model.path=m"])
    obj = Objective.from_config(cfg.method)
    assert (obj.method, obj.beta, obj.alpha, obj.gamma, obj.all_positions_mean, obj.wrapped_ignore_index) == \
        ("UNDIAL", 10.0, 0.0, 1.0, True, True)
    assert (cfg.optim.lr, cfg.optim.epochs) == (1e-5, 10)
    assert obj.needs_live_reference and not obj.cached_reference
    off = load_run_config(CONFIG, ["model.path=m", "method.all_positions_mean=false"]).method
    assert not off.all_positions_mean and off.wrapped_ignore_index
    with pytest.raises(NpoJaxError, match="method.all_positions_mean is not a hyperparameter of method.name=NPO"):
        load_run_config(None, ["output_dir=x", "model.path=m", "method.all_positions_mean=true"])


def test_short_run_trains_on_a_mesh_and_under_pmap(mini, tmp_path):
    """Two steps on the miniature TOFU with a live frozen teacher, a loss group of 2 spanning two
    devices' rows (the host's group lengths): the same losses on the data mesh and under pmap,
    and the run's final checkpoint written."""
    root, data, model = mini
    losses = {}
    for name, extra in {"data8": ["parallel.data=8"], "pmap8": ["parallel.strategy=pmap"]}.items():
        cfg = load_run_config(None, [
            f"model.path={model}", f"data.dir={data}", f"cache_dir={root}/cache", f"output_dir={tmp_path / name}",
            "data.max_length=128", "data.length_buckets=[96,128]", "optim.effective_batch=16",
            "optim.per_device_batch=1", "optim.loss_group=2", "optim.epochs=2", "optim.lr=1e-3",
            "checkpoint.export_hf=false", "method.name=UNDIAL", "method.alpha=1.0", *extra])
        trainer = Trainer(cfg, "unlearn", progress=False, max_steps=2)
        assert trainer.ref_params is not None and trainer.ref_logp is None and trainer.placement.span == 2
        trainer.train()
        metrics = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in metrics]
        assert sorted(p.name for p in (tmp_path / name / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert len(losses["data8"]) == 2 and np.all(np.isfinite(losses["data8"]))
    np.testing.assert_allclose(losses["pmap8"], losses["data8"], rtol=1e-4)
