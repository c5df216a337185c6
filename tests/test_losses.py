"""Losses and gradients against open-unlearning's formulas in PyTorch, on the same HF model and batch."""


import jax
import numpy as np
import pytest
import scipy.special
import torch
from hf_models import load_hf, make_hf_model, tiny_config

from npo_jax import logprobs
from npo_jax.data.batches import group_tokens, pad_examples
from npo_jax.data.tokenize import IGNORE, Example
from npo_jax.losses import Objective
from npo_jax.model import abstract_model, split_params
from npo_jax.model_io import load_hf_params
from npo_jax.params import param_specs
from npo_jax.parity.checks import LOSS_RTOL
from npo_jax.parity.torch_objective import batch_nll, hf_loss, kl_retain, npo_loss, simnpo_loss
from npo_jax.reference import reference_logprobs
from npo_jax.train_step import accumulated_grads
from npo_jax.tree_paths import get_path

RTOL, ATOL = LOSS_RTOL, 1e-6


def _examples(seed, n, vocab=256):
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        prompt, answer = rng.randint(3, 9), rng.randint(2, 8)
        ids = rng.randint(4, vocab, prompt + answer).astype(np.int32)
        labels = ids.copy()
        labels[:prompt] = IGNORE
        out.append(Example(ids, labels))
    return out


def _torch(batch):
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("losses")
    folder = make_hf_model(root / "m", tiny_config(tie=False, kv_heads=2, std=0.1))
    ref_folder = make_hf_model(root / "ref", tiny_config(tie=False, kv_heads=2, std=0.1), seed=1)
    return folder, ref_folder


def _ours(folder, ref_folder, obj, batch_np, ref_logp=None):
    cfg, params = load_hf_params(folder)
    _, ref_params = load_hf_params(ref_folder)
    graphdef, _ = split_params(abstract_model(cfg))
    micro = {k: v for k, v in batch_np.items()}
    if ref_logp is not None:
        micro["forget_ref_logp"] = ref_logp
    stacked = jax.tree.map(lambda x: np.asarray(x)[None], micro)  # one micro-batch
    loss, aux, grads = accumulated_grads(graphdef, obj, params, ref_params if obj.needs_live_reference else None,
                                         stacked, units=1)
    return cfg, float(loss), {k: float(v) for k, v in aux.items()}, grads


def _compare_grads(cfg, grads, hf):
    named = dict(hf.named_parameters())
    for spec in param_specs(cfg):
        ours = np.asarray(get_path(grads, spec.path))
        for i, name in enumerate(spec.hf_names(cfg.num_hidden_layers)):
            g = ours[i] if spec.stacked else ours
            ref = named[name].grad.numpy()
            np.testing.assert_allclose(spec.to_hf(g), ref, rtol=RTOL, atol=ATOL * np.abs(ref).max() + 1e-9,
                                       err_msg=name)


@pytest.mark.parametrize("logits", ["whole", "chunked", "every_position"])
@pytest.mark.parametrize("method,retain_loss,reference", [
    ("NPO", "NLL", "cached"), ("NPO", "NLL", "live"), ("NPO", "KL", "cached"),
    ("SimNPO", "NLL", "cached"), ("GradDiff", "NLL", "cached"), ("GradAscent", "NLL", "cached"),
])
def test_loss_and_grads_match_open_unlearning(models, method, retain_loss, reference, logits, monkeypatch):
    folder, ref_folder = models
    if logits == "chunked":  # the large-vocab path: chunks under jax.checkpoint (the last one padded)
        # a budget of 4 positions x 8 rows of 256-way logits: 4-position chunks for the 8-row
        # forget+retain pass, capped at CHUNK_POSITIONS = 4 for the 4-row ones
        monkeypatch.setattr(logprobs, "LOGITS_BUDGET_BYTES", 8 * 4 * 256 * 4)
        monkeypatch.setattr(logprobs, "CHUNK_POSITIONS", 4)
    chunk_maps = []  # the chunked path runs its chunks under lax.map; record each call's chunk length
    real_map = jax.lax.map
    monkeypatch.setattr(jax.lax, "map", lambda f, xs, **kw: chunk_maps.append(xs[0].shape[2]) or real_map(f, xs, **kw))
    # length 24: label_positions are 12 wide, -1 padded; "every_position" scores all positions instead
    forget = pad_examples(_examples(0, 4), 24, pad_id=0)
    retain = pad_examples(_examples(1, 4), 24, pad_id=0)
    assert forget["label_positions"].shape == (4, 12) and (forget["label_positions"] == -1).any()
    if logits == "every_position":
        forget, retain = ({k: v for k, v in g.items() if k != "label_positions"} for g in (forget, retain))
    beta = 4.5 if method == "SimNPO" else 0.1
    obj = Objective(method=method, beta=beta, alpha=2.0, gamma=0.7 if method != "NPO" else 1.0, delta=0.3,
                    retain_loss=retain_loss, reference=reference)

    hf, ref = load_hf(folder), load_hf(ref_folder)
    tf, tr = _torch(forget), _torch(retain)
    with torch.no_grad():
        ref_nll = batch_nll(ref, tf)
    if method == "NPO":
        forget_loss = npo_loss(hf, ref_nll, tf, beta)
    elif method == "SimNPO":
        forget_loss = simnpo_loss(hf, tf, beta, obj.delta)
    else:
        forget_loss = -hf_loss(hf, tf)
    total = obj.gamma * forget_loss
    retain_loss_t = None
    if method != "GradAscent":
        retain_loss_t = hf_loss(hf, tr) if retain_loss == "NLL" else kl_retain(hf, ref, tr)
        total = total + obj.alpha * retain_loss_t
    total.backward()

    batch = {"forget": forget, "retain": retain}
    cfg, loss, aux, grads = _ours(folder, ref_folder, obj, batch, ref_logp=-ref_nll.numpy())
    np.testing.assert_allclose(loss, total.item(), rtol=RTOL)
    np.testing.assert_allclose(aux["forget_loss"], forget_loss.item(), rtol=RTOL)
    if retain_loss_t is not None:
        np.testing.assert_allclose(aux["retain_loss"], retain_loss_t.item(), rtol=RTOL)
    _compare_grads(cfg, grads, hf)
    assert bool(chunk_maps) == (logits == "chunked") and set(chunk_maps) <= {4}


def test_cached_reference_equals_live(models):
    folder, ref_folder = models
    batch = {"forget": pad_examples(_examples(2, 4), 16, pad_id=0),
             "retain": pad_examples(_examples(3, 4), 16, pad_id=0)}
    ref = load_hf(ref_folder)
    with torch.no_grad():
        ref_logp = -batch_nll(ref, _torch(batch["forget"])).numpy()
    _, live, _, g_live = _ours(folder, ref_folder, Objective("NPO", reference="live"), batch)
    _, cached, _, g_cached = _ours(folder, ref_folder, Objective("NPO", reference="cached"), batch, ref_logp)
    np.testing.assert_allclose(cached, live, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max()),
                 g_cached, g_live)


def test_units_average_like_hf_accumulation(models):
    """Two units of 2 = mean of the two micro-batch losses HF would accumulate (token means per unit)."""
    folder, ref_folder = models
    forget = pad_examples(_examples(4, 4), 16, pad_id=0)
    hf = load_hf(folder)
    halves = [{k: v[i:i + 2] for k, v in forget.items()} for i in (0, 2)]
    expected = np.mean([-hf_loss(hf, _torch(h)).item() for h in halves])
    cfg, params = load_hf_params(folder)
    graphdef, _ = split_params(abstract_model(cfg))
    stacked = jax.tree.map(lambda x: np.asarray(x)[None], {"forget": forget})
    loss, _, _ = accumulated_grads(graphdef, Objective("GradAscent"), params, None, stacked, units=2)
    np.testing.assert_allclose(float(loss), expected, rtol=RTOL)
    # and the same split as two accumulation steps of one unit each
    two_steps = jax.tree.map(lambda x: np.asarray(x).reshape(2, 2, *x.shape[1:]), {"forget": forget})
    loss2, _, _ = accumulated_grads(graphdef, Objective("GradAscent"), params, None, two_steps, units=1)
    np.testing.assert_allclose(float(loss2), expected, rtol=RTOL)


def test_tiny_ref_model_is_really_different(models):
    folder, ref_folder = models
    a, b = load_hf(folder), load_hf(ref_folder)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_cached_reference_logprobs_match_open_unlearning(models):
    """The reference cache's values (length-bucketed batches, the last one filled up, LM head on
    label positions) equal open-unlearning's compute_batch_nll on each example alone."""
    _, ref_folder = models
    examples = _examples(5, 7)
    cfg, params = load_hf_params(ref_folder)
    graphdef, _ = split_params(abstract_model(cfg))
    ours = reference_logprobs(graphdef, params, examples, buckets=[8, 12, 24], pad_id=0, eot_id=None,
                             eot_mask_quirk=False, batch_size=3)
    ref = load_hf(ref_folder)
    with torch.no_grad():
        want = [-batch_nll(ref, {k: torch.tensor(np.asarray(v)[None], dtype=torch.long) for k, v in
                                 (("input_ids", e.input_ids), ("labels", e.labels),
                                  ("attention_mask", np.ones_like(e.input_ids)))}).item() for e in examples]
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-4)


def test_first_argmax_is_numpys_argmax():
    """The two-stage argmax against numpy's: ties across and within blocks (the first wins), a NaN
    (counts as the maximum, as in numpy and torch), a vocabulary that is not a multiple of 128, and
    the (batch, positions, vocab) layout the scorer uses; `logsumexp_and_argmax` against numpy's
    argmax and scipy's logsumexp on the same rows (NaN where a logit is NaN, inf where one is inf)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 1024)).astype(np.float32)
    x[0, 0, [300, 900]] = 9.0  # tie across blocks
    x[0, 1, [260, 261]] = 9.0  # tie within a block
    x[1, 2, 700] = np.nan
    x[1, 3, 5] = np.inf
    x[1, 4] = -np.inf  # a row with nothing possible
    for logits in (x, x[0], rng.standard_normal((4, 1000)).astype(np.float32)):
        got = np.asarray(jax.jit(logprobs.first_argmax)(logits))
        np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
        lse, pred = jax.jit(logprobs.logsumexp_and_argmax)(logits)
        np.testing.assert_array_equal(np.asarray(pred), np.argmax(logits, axis=-1))
        np.testing.assert_allclose(np.asarray(lse), scipy.special.logsumexp(logits, axis=-1), rtol=1e-6)
    assert np.asarray(logprobs.first_argmax(x))[0, 0] == 300 and np.asarray(logprobs.first_argmax(x))[1, 2] == 700


@pytest.mark.parametrize("method", ["GradDiff", "NPO", "finetune"])
def test_loss_group_spanning_units_is_exact(models, method):
    """One loss group of 4 examples spread over accumulation micro-batches and units (`span`,
    with the group's token count from the host) gives the loss and gradients of the group in one
    micro-batch: token means over the whole group, not over each part."""
    folder, ref_folder = models
    forget, retain = pad_examples(_examples(6, 4), 16, pad_id=0), pad_examples(_examples(7, 4), 16, pad_id=0)
    obj = Objective.finetune() if method == "finetune" else Objective(method, alpha=2.0)
    cfg, params = load_hf_params(folder)
    graphdef, _ = split_params(abstract_model(cfg))
    step = {"forget": forget, "retain": retain}
    if method == "NPO":
        step["forget_ref_logp"] = -batch_nll(load_hf(ref_folder), _torch(forget)).detach().numpy()
    whole = accumulated_grads(graphdef, obj, params, None, jax.tree.map(lambda x: np.asarray(x)[None], step), units=1)
    examples = {"forget": _examples(6, 4), "retain": _examples(7, 4)}
    for name in ("forget", "retain"):
        step[name] = {**step[name], "group_tokens": group_tokens(examples[name], 16, 4)}
        assert np.all(step[name]["group_tokens"] == (step[name]["labels"][:, 1:] != IGNORE).sum())
    # (accumulation micro-batches, rows each, units per micro-batch, span)
    for accum, rows, units, span in ((4, 1, 1, 4), (2, 2, 2, 4), (2, 2, 1, 2)):
        parts = jax.tree.map(lambda x, a=accum, r=rows: np.asarray(x).reshape(a, r, *x.shape[1:]), step)
        loss, aux, grads = accumulated_grads(graphdef, obj, params, None, parts, units=units, span=span)
        np.testing.assert_allclose(float(loss), float(whole[0]), rtol=1e-5, err_msg=f"{accum}x{rows}")
        for k in aux:
            np.testing.assert_allclose(float(aux[k]), float(whole[1][k]), rtol=1e-5, err_msg=k)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max()),
                     grads, whole[2])
