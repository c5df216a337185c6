"""LoRA against PEFT + torch: logits, every adapter gradient of open-unlearning's objectives and
three AdamW steps (float32, rtol 1e-4); the reference is the base model with no second copy;
the `lora` config section; LoRA runs on every placement, resume and the base-model check."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from hf_models import load_hf, make_hf_model, tiny_config
from method_parity import examples
from method_parity import open_unlearning_on_batch as _open_unlearning
from test_methods import ou_trainers  # noqa: F401 (a fixture)
from test_train import _losses, _overrides, _train, mini  # noqa: F401 (a fixture)
from tofu_fixture import add_eval_splits, make_tiny_model_with_tokenizer

from npo_jax.data.batches import label_width, pad_examples
from npo_jax.errors import NpoJaxError
from npo_jax.lora import (
    LoraModel,
    LoraSpec,
    adapter_shapes,
    base_checksum,
    init_adapters,
    module_path,
    split_adapters,
)
from npo_jax.losses import Objective
from npo_jax.model import abstract_model, split_params
from npo_jax.model_io import load_hf_params
from npo_jax.optim import make_optimizer
from npo_jax.run_config import load_run_config
from npo_jax.train import Trainer
from npo_jax.train_step import _apply, accumulated_grads, init_state
from npo_jax.tree_paths import get_path, iter_paths, set_path

peft = pytest.importorskip("peft")

RTOL = 1e-4
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SOME = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("lora") / "m", tiny_config(tie=False, kv_heads=2, std=0.1))


def _peft(folder, spec: LoraSpec, seed=0):
    """A PEFT LoRA model on the HF base, its adapters set to random values (B nonzero)."""
    config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                             lora_dropout=0.0)
    model = peft.get_peft_model(load_hf(folder), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _hf_name(path, i):
    group = "self_attn" if path[1] == "self_attn" else "mlp"
    ab = "lora_A" if path[-1] == "lora_a" else "lora_B"
    return f"base_model.model.model.layers.{i}.{group}.{path[2]}.{ab}.default.weight"


def _adapters_from(model, cfg, spec, grad=False):
    """Our adapter tree (layers, in, r) / (layers, r, out) from PEFT's (r, in) / (out, r) tensors."""
    named = dict(model.named_parameters())
    out: dict = {}
    for path in adapter_shapes(cfg, spec):
        ts = [named[_hf_name(path, i)] for i in range(cfg.num_hidden_layers)]
        set_path(out, path, np.stack([(t.grad if grad else t.detach()).numpy().T for t in ts]))
    return out


def _batch():
    groups = {"forget": examples(0, 4), "retain": examples(1, 4)}
    width = label_width(sum(groups.values(), []), 24)
    return {k: pad_examples(v, 24, pad_id=0, width=width) for k, v in groups.items()}


def _ours(folder, spec):
    cfg, base = load_hf_params(folder)
    return cfg, base, LoraModel(cfg, spec, compute_dtype=jnp.float32, remat="full")


@pytest.mark.parametrize("targets", [ALL, SOME], ids=["all", "some"])
def test_logits_match_peft(folder, targets):
    spec = LoraSpec(4, 8.0, 0.0, targets)
    hf = _peft(folder, spec)
    cfg, base, lora = _ours(folder, spec)
    ids = np.random.RandomState(0).randint(4, 256, (2, 12))
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
        with hf.disable_adapter():
            base_want = hf(torch.tensor(ids)).logits.numpy()
    model, ref = lora.models(_adapters_from(hf, cfg, spec), base)
    got = np.asarray(model(jnp.asarray(ids)))
    scale = np.abs(want).max()
    assert np.abs(want - base_want).max() > 0.05 * scale  # the adapters really change the output
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)
    # the reference is the same base params without the adapters: PEFT's disable_adapter()
    np.testing.assert_allclose(np.asarray(ref(jnp.asarray(ids))), base_want, rtol=0, atol=1e-4 * scale)


def _torch_loss(name, hparams, hf, folder, ou_trainers, batch):  # noqa: F811
    if name == "finetune":  # HF's mean token NLL of the training answers
        loss = hf(**{k: torch.tensor(batch["forget"][k], dtype=torch.long)
                     for k in ("input_ids", "attention_mask", "labels")}).loss
        loss.backward()
        return loss.item()
    # open-unlearning's reference model is the base: a second HF copy of it (ours has none)
    return _open_unlearning(ou_trainers[name], hparams, hf, load_hf(folder), batch)


CASES = [
    ("NPO", {"beta": 0.3, "alpha": 2.0, "gamma": 0.7, "retain_loss": "NLL"}, ALL),
    ("NPO", {"beta": 0.3, "alpha": 2.0, "gamma": 0.7, "retain_loss": "KL"}, SOME),
    ("GradDiff", {"alpha": 2.0, "gamma": 0.7, "retain_loss": "NLL"}, SOME),
    ("finetune", {}, ALL),
]


def _objective(name, hparams):
    return Objective.finetune() if name == "finetune" else Objective(name, reference="live", **hparams)


@pytest.mark.parametrize("name,hparams,targets", CASES, ids=[f"{c[0]}-{c[1].get('retain_loss', '')}" for c in CASES])
def test_adapter_gradients_match_peft(folder, ou_trainers, name, hparams, targets):  # noqa: F811
    spec = LoraSpec(4, 8.0, 0.0, targets)
    batch = _batch()
    hf = _peft(folder, spec)
    want = _torch_loss(name, hparams, hf, folder, ou_trainers, batch)
    cfg, base, lora = _ours(folder, spec)
    stacked = jax.tree.map(lambda x: np.asarray(x)[None], batch)
    loss, _, grads = accumulated_grads(lora, _objective(name, hparams), _adapters_from(hf, cfg, spec), base,
                                       stacked, units=1)
    np.testing.assert_allclose(float(loss), want, rtol=RTOL)
    assert set(jax.tree.leaves(jax.tree.map(lambda _: 1, grads))) == {1}
    expected = _adapters_from(hf, cfg, spec, grad=True)
    worst = 0.0
    for path in adapter_shapes(cfg, spec):
        ref, got = get_path(expected, path), np.asarray(get_path(grads, path))
        # entries near zero: float32 noise of a few 1e-6 of the tensor's largest entry
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=1e-5 * np.abs(ref).max(), err_msg="/".join(path))
        worst = max(worst, np.abs(got - ref).max() / np.abs(ref).max())
    print(f"{name} {hparams} {len(targets)} targets: loss {want:.6f}, max adapter grad diff {worst:.1e} of max")


def test_three_adamw_steps_match_peft_and_torch_adamw(folder, ou_trainers):  # noqa: F811
    """torch AdamW over the adapters with HF Trainer's settings (weight decay on lora_A/lora_B: not
    biases or norms), clipping at 1.0 and a linear decay, three steps on three batches."""
    name, hparams = "NPO", {"beta": 0.3, "alpha": 2.0, "gamma": 0.7, "retain_loss": "NLL"}
    spec, lr, steps = LoraSpec(4, 8.0, 0.0, SOME), 1e-2, 3
    hf = _peft(folder, spec)
    cfg, base, lora = _ours(folder, spec)
    adapters = _adapters_from(hf, cfg, spec)
    params = [p for n, p in hf.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in hf.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.0, (steps - k) / steps))
    tx, schedule = make_optimizer(adapters, lr=lr, total_steps=steps, warmup=0, weight_decay=0.01, max_grad_norm=1.0)
    obj = _objective(name, hparams)

    @jax.jit
    def step(state, batch):
        loss, aux, grads = accumulated_grads(lora, obj, state["params"], base, batch, units=1)
        return _apply(state, grads, loss, aux, tx, schedule)

    state = init_state(adapters, tx)
    ref = load_hf(folder)
    for k in range(steps):
        groups = {"forget": examples(10 + k, 4), "retain": examples(20 + k, 4)}
        width = label_width(sum(groups.values(), []), 24)
        batch = {g: pad_examples(v, 24, pad_id=0, width=width) for g, v in groups.items()}
        opt.zero_grad()
        _open_unlearning(ou_trainers[name], hparams, hf, ref, batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        state, _ = step(state, jax.tree.map(lambda x: np.asarray(x)[None], batch))
    moved = 0.0
    want = _adapters_from(hf, cfg, spec)
    for path in adapter_shapes(cfg, spec):
        got, ref_val = np.asarray(get_path(state["params"], path)), get_path(want, path)
        moved = max(moved, np.abs(ref_val - get_path(adapters, path)).max())
        np.testing.assert_allclose(got, ref_val, rtol=RTOL, atol=1e-5 * lr * 100, err_msg="/".join(path))
    assert moved > 0.5 * lr  # Adam moved the adapters by about lr per step


def test_init_is_peft_default_and_base_gets_no_state():
    cfg = load_hf_params.__globals__["LlamaConfig"].from_hf_dict(tiny_config(tie=False).to_dict())
    spec = LoraSpec(8, 16.0, 0.0, SOME)
    adapters = init_adapters(cfg, spec, seed=3)
    a = get_path(adapters, (*module_path("q_proj"), "lora_a"))
    assert a.shape == (cfg.num_hidden_layers, cfg.hidden_size, 8) and a.dtype == np.float32
    assert np.abs(a).max() <= 1 / np.sqrt(cfg.hidden_size) and a.std() > 0.3 / np.sqrt(cfg.hidden_size)
    assert not np.any(get_path(adapters, (*module_path("down_proj"), "lora_b")))
    _, params = split_params(abstract_model(cfg, lora=spec))
    base, only = split_adapters(params)
    _, plain = split_params(abstract_model(cfg))
    assert jax.tree.structure(base) == jax.tree.structure(plain)
    assert jax.tree.structure(only) == jax.tree.structure(adapters)


def _cfg(*overrides):
    return load_run_config(None, ["output_dir=x", "model.path=m", *overrides])


def test_lora_config_section():
    assert _cfg().lora.rank == 0 and LoraSpec.from_config(_cfg().lora) is None
    spec = LoraSpec.from_config(_cfg("lora.rank=16", "lora.alpha=32", "lora.targets=[q_proj,v_proj]").lora)
    assert (spec.rank, spec.scale, spec.targets) == (16, 2.0, ("q_proj", "v_proj"))
    for bad, fragment in [("lora.rank=-1", "lora.rank=-1 is out of range"),
                          ("lora.alpha=0", "lora.alpha=0.0 is out of range"),
                          ("lora.dropout=1.0", "lora.dropout=1.0 is out of range"),
                          ("lora.targets=[q_proj,lm_head]", "unknown: lm_head"),
                          ("lora.targets=[q_proj,q_proj]", "must be distinct"),
                          ("lora.targets=[]", "at least one"),
                          ("lora.base_dtype=int8", "lora.base_dtype")]:
        with pytest.raises(NpoJaxError, match=fragment):
            _cfg("lora.rank=4", bad)


def test_dropout_on_the_adapter_input_only_in_training():
    """PEFT's lora_dropout: each input entry to A is dropped with probability p, the rest scaled by
    1/(1-p); with A and B identities the adapter's output shows the mask directly."""
    from flax import nnx

    from npo_jax.model import Linear

    p, d = 0.25, 64
    spec = LoraSpec(d, 2.0 * d, p, ("q_proj",))
    layer = Linear(d, 8, use_bias=False, stack=(), rngs=nnx.Rngs(0), param_dtype=jnp.float32,
                   compute_dtype=jnp.float32, lora=spec)
    layer.kernel[...] = jnp.zeros((d, 8))
    layer.lora_a[...] = jnp.eye(d)
    layer.lora_b[...] = jnp.eye(d)[:, :8]
    x = jnp.asarray(np.random.RandomState(0).uniform(1, 2, (400, d)), jnp.float32)
    outs = []
    for seed in (1, 2):
        layer.lora_key[...] = jax.random.PRNGKey(seed)
        outs.append(np.asarray(layer(x)))
    y = outs[0]
    kept = y != 0
    np.testing.assert_allclose(y[kept], (2.0 * x[:, :8] / (1 - p))[kept], rtol=1e-6)  # scale alpha/rank = 2
    assert abs((~kept).mean() - p) < 0.03
    assert (outs[0] != outs[1]).any()  # another key, another mask
    # the step's keys: per micro-batch and per adapter, from the seed and step
    cfg = load_hf_params.__globals__["LlamaConfig"].from_hf_dict(tiny_config(tie=False).to_dict())
    lora = LoraModel(cfg, LoraSpec(4, 8.0, p, SOME), compute_dtype=jnp.float32, remat="none", seed=5)
    assert lora.dropout and len(lora.key_paths) == len(SOME)
    keys = jax.tree.leaves(lora.dropout_keys(jax.random.PRNGKey(0)))
    assert keys[0].shape == (cfg.num_hidden_layers, 2) and not np.array_equal(keys[0], keys[1])
    assert not LoraModel(cfg, lora.spec.without_dropout(), compute_dtype=jnp.float32, remat="none").key_paths


def test_live_reference_is_the_base_without_a_copy(folder):
    """With LoRA the step's second argument is the base params themselves (the reference is the
    base model), whether or not the method needs a live reference; no copy is made."""
    from npo_jax.placement import ShardedPlacement

    cfg, base, lora = _ours(folder, LoraSpec(4, 8.0, 0.0, SOME))
    run = _cfg("lora.rank=4", "parallel.data=1", "optim.effective_batch=4")
    placement = ShardedPlacement(run)
    base = jax.device_put(base, placement.param_shardings(cfg))
    adapters = init_adapters(cfg, lora.spec, 0)
    tx, schedule = make_optimizer(adapters, lr=1e-3, total_steps=2, warmup=0, weight_decay=0.0, max_grad_norm=1.0)
    for obj in (Objective("NPO", reference="live"), Objective("NPO", reference="cached"), Objective.finetune()):
        placed = placement.start(lora, cfg, adapters, obj, tx, schedule, base=base)
        assert all(a is b for a, b in zip(jax.tree.leaves(placed.ref_params), jax.tree.leaves(base), strict=True))
        assert jax.tree.structure(placed.state["params"]) == jax.tree.structure(adapters)


def _lora_run(mini, out, *extra, **kw):  # noqa: F811
    return _train(mini, out, "lora.rank=4", "lora.alpha=8", "optim.lr=1e-2", *extra, **kw)


def test_lora_runs_agree_on_every_placement_and_resume(mini, tmp_path):  # noqa: F811
    """A LoRA NPO run (cached reference, base frozen) on one device, over data x fsdp x tensor and
    under pmap: the same losses and adapters; resumed half-way, the same again."""
    runs = {"one_device": ["parallel.data=1"], "d2f2t2": ["parallel.data=2", "parallel.fsdp=2", "parallel.tensor=2"],
            "pmap8": ["parallel.strategy=pmap"]}
    losses, adapters = {}, {}
    for name, extra in runs.items():
        trainer = _lora_run(mini, tmp_path / name, *extra, "checkpoint.every_steps=2", max_steps=4)
        losses[name], adapters[name] = _losses(tmp_path / name), trainer.params()
    assert len(losses["one_device"]) == 4 and np.ptp(losses["one_device"]) > 0.01
    assert {path[-1] for path, _ in iter_paths(adapters["one_device"])} == {"lora_a", "lora_b"}
    for name in runs:
        np.testing.assert_allclose(losses[name], losses["one_device"], rtol=1e-4, err_msg=name)
        jax.tree.map(lambda a, b, n=name: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6, err_msg=n),
                     adapters[name], adapters["one_device"])
    # resume from step 2 of a 4-step run: the same adapters as the straight run
    _lora_run(mini, tmp_path / "split", "parallel.data=1", "checkpoint.every_steps=2", max_steps=2)
    resumed = _lora_run(mini, tmp_path / "split", "parallel.data=1", "checkpoint.every_steps=2", max_steps=4,
                        resume=True)
    assert resumed.start_step == 2
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), resumed.params(),
                 adapters["one_device"])
    # the checkpoint: adapters and their optimizer state only, and the base model's record
    step = tmp_path / "split" / "checkpoints" / "4"
    saved = ocp.PyTreeCheckpointer().metadata((step / "state").absolute()).item_metadata.tree
    assert {path[-1] for path, _ in iter_paths(saved["params"])} == {"lora_a", "lora_b"}
    adapter_sizes = {tuple(leaf.shape) for _, leaf in iter_paths(saved["params"])}
    assert {tuple(leaf.shape) for leaf in jax.tree.leaves(saved["opt_state"])} == adapter_sizes | {()}
    meta = json.loads((step / "meta" / "metadata").read_text())
    assert meta["base_model"] == {"path": str(mini[2].resolve()), "sha256": base_checksum(mini[2])}


def test_resume_refuses_another_base_model(mini, tmp_path):  # noqa: F811
    trainer = _lora_run(mini, tmp_path / "run", "parallel.data=1", "lora.base_dtype=bfloat16", max_steps=1)
    # the frozen base stays in bfloat16; the adapters and their AdamW moments are float32
    assert {x.dtype for x in jax.tree.leaves(trainer.ref_params)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(trainer.state["params"])} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(trainer.state["opt_state"]) if x.ndim} == {jnp.dtype(jnp.float32)}
    with pytest.raises(NpoJaxError, match="the checkpoints of a LoRA run"):
        _lora_run(mini, tmp_path / "next", f"model.path={tmp_path / 'run' / 'checkpoints'}")
    other = make_tiny_model_with_tokenizer(tmp_path / "other", mini[1], seed=7)
    assert base_checksum(other) != base_checksum(mini[2])
    cfg = load_run_config(None, _overrides(mini, tmp_path / "run", "lora.rank=4", "lora.alpha=8", "optim.lr=1e-2",
                                           "parallel.data=1", "lora.base_dtype=bfloat16", f"model.path={other}"))
    with pytest.raises(NpoJaxError, match=r"the adapters were trained on the base model .*\(another base model\)"):
        Trainer(cfg, "unlearn", resume=True, progress=False)


def test_export_merged_and_peft_adapter_folders(mini, tmp_path):  # noqa: F811
    """The run's HF export (base + adapters merged in float32) loads in transformers, and the
    `--adapter` PEFT folder loads with PeftModel.from_pretrained on the HF base: both give our logits."""
    from npo_jax.cli import main

    out = tmp_path / "run"
    trainer = _lora_run(mini, out, "parallel.data=1", "checkpoint.export_hf=true",
                        "lora.targets=[q_proj,v_proj,down_proj]", "optim.lr=5e-2", max_steps=3)
    cfg, base = load_hf_params(mini[2])
    lora = LoraModel(cfg, trainer.graphdef.spec, compute_dtype=jnp.float32, remat="none")
    ids = np.random.RandomState(0).randint(4, cfg.vocab_size, (2, 16))
    model, ref = lora.models(jax.device_get(trainer.params()), base)
    ours, base_logits = np.asarray(model(jnp.asarray(ids))), np.asarray(ref(jnp.asarray(ids)))
    scale = np.abs(ours).max()
    assert np.abs(ours - base_logits).max() > 1e-2 * scale  # the adapters moved the model
    with torch.no_grad():
        merged = load_hf(out / "hf")(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(merged, ours, rtol=0, atol=1e-4 * scale)
    main(["convert", "orbax-to-hf", str(out / "checkpoints"), str(tmp_path / "adapter"), "--adapter"])
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    with torch.no_grad():
        hf = peft.PeftModel.from_pretrained(load_hf(mini[2]), tmp_path / "adapter").eval()
        via_peft = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(via_peft, ours, rtol=0, atol=1e-4 * scale)


def test_peft_adapter_folder_as_starting_point(folder, tmp_path):
    """A folder PEFT's save_pretrained wrote (lora.init_from) gives exactly its adapters; one of
    another rank or targets is an error naming the keys to set."""
    from npo_jax.lora import load_peft_adapters

    spec = LoraSpec(4, 8.0, 0.0, SOME)
    hf = _peft(folder, spec, seed=3)
    hf.save_pretrained(tmp_path / "adapter")
    cfg, _ = load_hf_params(folder)
    got = load_peft_adapters(tmp_path / "adapter", cfg, spec)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, _adapters_from(hf, cfg, spec))
    with pytest.raises(NpoJaxError, match="set lora.rank, lora.alpha, lora.targets"):
        load_peft_adapters(tmp_path / "adapter", cfg, LoraSpec(8, 8.0, 0.0, SOME))
    with pytest.raises(NpoJaxError, match="not a PEFT adapter folder"):
        load_peft_adapters(tmp_path, cfg, spec)


def test_rmu_refuses_lora(mini, tmp_path):  # noqa: F811
    """RMU's update mask selects base parameters (trainable_params_regex), which LoRA freezes."""
    cfg = load_run_config(None, _overrides(mini, tmp_path / "run", "lora.rank=4", "lora.alpha=8", "parallel.data=1",
                                           "method.name=RMU", r"method.module_regex=model\.layers\.0"))
    with pytest.raises(NpoJaxError, match="does not run with lora.rank > 0"):
        Trainer(cfg, "unlearn", progress=False)


def test_eval_reads_an_adapter_run_as_its_merged_export(mini, tmp_path):  # noqa: F811
    """`npo-jax eval --run RUN` on a LoRA run (adapters only in its checkpoints) loads the base with
    the adapters merged in float32: the same TOFU log as evaluating its float32 merged HF export."""
    from npo_jax.cli import main
    from npo_jax.model_io import load_model

    out = tmp_path / "run"
    _lora_run(mini, out, "parallel.data=1", "checkpoint.export_hf=true", "checkpoint.export_dtype=float32",
              "lora.targets=[q_proj,v_proj,down_proj]", "optim.lr=5e-2", max_steps=3)
    adapter_run, merged = load_model(out / "checkpoints"), load_model(out / "hf")
    assert adapter_run.kind == "lora" and merged.kind == "hf"
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), adapter_run.params, merged.params)
    base = load_model(mini[2]).params
    moved = get_path(adapter_run.params, ("layers", "self_attn", "q_proj", "kernel")) - get_path(
        base, ("layers", "self_attn", "q_proj", "kernel"))
    assert np.abs(moved).max() > 1e-4  # the adapters are in
    data = add_eval_splits(Path(shutil.copytree(mini[1], tmp_path / "data")))
    common = ["--limit", "4", "--max-new-tokens", "8", "--data-dir", str(data), "--tfds-dir", str(tmp_path / "tfds")]
    assert main(["eval", "--run", str(out), *common]) == 0
    assert main(["eval", str(out / "hf"), "--run", str(out), "--out", str(tmp_path / "merged_eval"), *common]) == 0
    ours = json.loads((out / "eval" / "TOFU_EVAL.json").read_text())
    theirs = json.loads((tmp_path / "merged_eval" / "TOFU_EVAL.json").read_text())
    assert ours.keys() == theirs.keys()
    aggs = [{k: v["agg_value"] for k, v in log.items() if isinstance(v, dict) and v.get("agg_value") is not None}
            for log in (ours, theirs)]
    assert len(aggs[1]) >= 10 and aggs[0] == pytest.approx(aggs[1], rel=1e-5, abs=1e-7)


def test_memory_plan_lora_step_holds_one_base_and_the_adapter_state():
    """scripts/memory_plan.py --lora-rank: the compiled LoRA step's arguments are one bfloat16 base
    (no reference copy), the float32 adapters and their two AdamW moments, and the batch; the
    float32 weight copies it subtracts are exactly the base's float32 size (XLA:CPU's bf16 dots)."""
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import memory_plan as mp

    from npo_jax.config import LlamaConfig

    cfg = LlamaConfig.from_hf_dict({**mp.LLAMA32_3B, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "head_dim": 16}, "tiny")
    args = argparse.Namespace(batch=4, per_device_batch=2, seq=32, dtype="bfloat16", remat="full",
                              reference="cached", lora_rank=4, lora_targets=list(ALL), base_dtype="bfloat16")
    compiled, _ = mp.compile_step(cfg, "one device", args)
    base = sum(x.size for x in jax.tree.leaves(split_params(abstract_model(cfg))[1]))
    adapters = sum(int(np.prod(s)) for s in adapter_shapes(cfg, LoraSpec(4, 8.0, 0.0, ALL)).values())
    batch = sum(x.size * 4 for x in jax.tree.leaves(mp.abstract_batch(2, 2, 32, True)))
    m = compiled.memory_analysis()
    counters = 8 * 4  # step, AdamW count and schedule counters: a few int32 scalars at most
    low = base * 2 + adapters * 4 * 3 + batch
    assert low <= m.argument_size_in_bytes <= low + counters
    row = mp.memory_row(compiled, cfg, True)
    weights = sum(x.size for x in jax.tree.leaves(split_params(abstract_model(cfg))[1]) if x.ndim >= 2)
    assert row["cpu_weight_upcasts_gib"] * mp.GIB == weights * 4
