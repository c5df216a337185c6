"""Our optax optimizer against torch.optim.AdamW with HF's linear warmup/decay schedule."""

import re

import jax
import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from npo_jax.optim import clip_grad_norm, decay_mask, make_optimizer, warmup_steps


def test_warmup_steps_as_open_unlearning():
    assert warmup_steps(1.0, 400, 32) == 12  # forget10
    assert warmup_steps(1.0, 4000, 32) == 125  # full fine-tune
    assert warmup_steps(0.5, 40, 32) == 0


def test_clipping_is_torchs_clip_grad_norm():
    """Scale min(1, max_norm / (norm + 1e-6)), as torch does it. Just above the limit the eps is
    visible: optax's clip_by_global_norm (t / norm, no eps) is 1e-6 off there, and no scaling at all
    is 1e-6 off too; far below it, nothing changes."""
    rng = np.random.RandomState(1)
    base = {"a": rng.randn(7, 5).astype(np.float32), "b": rng.randn(11).astype(np.float32)}
    norm = np.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in base.values()))
    for target in (1.0 + 5e-7, 3.0, 0.5):
        grads = {k: (v * (target / norm)).astype(np.float32) for k, v in base.items()}
        ours, _ = clip_grad_norm(1.0).update(grads, None)
        tgrads = [torch.tensor(grads[k]) for k in ("a", "b")]
        for t in tgrads:
            t.grad = t.clone()
        torch.nn.utils.clip_grad_norm_(tgrads, 1.0)
        for k, t in zip(("a", "b"), tgrads, strict=True):
            np.testing.assert_allclose(np.asarray(ours[k]), t.grad.numpy(), rtol=2e-7, atol=0)
            if target < 1:
                np.testing.assert_array_equal(np.asarray(ours[k]), grads[k])
            else:
                assert not np.allclose(t.grad.numpy(), grads[k], rtol=5e-7, atol=0)


# transformers' Trainer.get_decay_parameter_names: no weight decay for a parameter whose name
# matches one of these (checked here on the HF-style dotted names of our param paths)
HF_NO_DECAY = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def _hf_decays(path) -> bool:
    name = ".".join(k.key for k in path)
    return not any(re.search(p, name) for p in HF_NO_DECAY)


def test_adamw_steps_match_torch_with_hf_schedule():
    rng = np.random.RandomState(0)
    params = {
        "layers": {"mlp": {"up_proj": {"kernel": rng.randn(2, 6, 5).astype(np.float32)}},
                   "input_layernorm": {"scale": 1 + 0.1 * rng.randn(2, 6).astype(np.float32)},
                   "self_attn": {"q_proj": {"bias": rng.randn(2, 5).astype(np.float32)}}},
        "embed_tokens": {"embedding": rng.randn(10, 6).astype(np.float32)},
        "norm": {"scale": 1 + 0.1 * rng.randn(6).astype(np.float32)},
        "lm_head": {"kernel": rng.randn(6, 10).astype(np.float32)},
    }
    lr, wd, warmup, total = 2e-3, 0.01, 2, 6
    grads_seq = [jax.tree.map(lambda p, s=s: (3.0 if s % 2 else 0.05) * rng.randn(*p.shape).astype(np.float32),
                              params) for s in range(4)]  # odd steps: norm > 1, so clipping acts

    tx, schedule = make_optimizer(params, lr=lr, total_steps=total, warmup=warmup, weight_decay=wd, max_grad_norm=1.0)
    state = tx.init(params)
    ours = params
    for g in grads_seq:
        updates, state = tx.update(g, state, ours)
        ours = jax.tree.map(lambda p, u: p + u, ours, updates)

    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(params)[0], strict=True)
    decays = [_hf_decays(path) for path in paths]  # torch's groups from HF's rule, not from our decay_mask
    names = {".".join(k.key for k in path) for path, d in zip(paths, decays, strict=True) if d}
    assert names == {"embed_tokens.embedding", "layers.mlp.up_proj.kernel", "lm_head.kernel"}
    assert jax.tree.leaves(decay_mask(params)) == decays
    tparams = [torch.nn.Parameter(torch.tensor(x)) for x in leaves]
    groups = [{"params": [p for p, d in zip(tparams, decays, strict=True) if d], "weight_decay": wd},
              {"params": [p for p, d in zip(tparams, decays, strict=True) if not d], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    sched = get_linear_schedule_with_warmup(opt, warmup, total)
    lrs = []
    for g in grads_seq:
        for p, gl in zip(tparams, jax.tree.leaves(g), strict=False):
            p.grad = torch.tensor(gl)
        torch.nn.utils.clip_grad_norm_(tparams, 1.0)
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        opt.zero_grad()

    np.testing.assert_allclose([float(schedule(k)) for k in range(4)], lrs, rtol=1e-6)
    assert lrs[0] == 0.0 and lrs[2] == lr  # HF: the first warmup update uses lr 0
    for ours_leaf, p in zip(jax.tree.leaves(ours), tparams, strict=False):
        np.testing.assert_allclose(np.asarray(ours_leaf), p.detach().numpy(), atol=1e-5, rtol=0)
    # and the updates were not trivially zero
    assert max(np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(ours), leaves, strict=False)) > 1e-3


def test_adamw_moments_are_sharded_like_their_params():
    """Left to the compiler, tx.init's zeros came out replicated: the whole AdamW state on every device."""
    from flax import nnx

    from npo_jax.config import LlamaConfig
    from npo_jax.model import LlamaForCausalLM, split_params
    from npo_jax.sharding import make_mesh, param_shardings
    from npo_jax.train_step import init_state, state_shardings

    raw = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
    cfg = LlamaConfig.from_hf_dict(raw, "tiny")
    _, params = split_params(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    mesh = make_mesh(1, 8, 1)
    shardings = param_shardings(cfg, mesh)
    params = jax.device_put(params, shardings)
    tx, _ = make_optimizer(params, lr=1e-3, total_steps=10, warmup=0, weight_decay=0.01, max_grad_norm=1.0)
    target = state_shardings(tx, params, shardings, mesh)
    state = jax.jit(lambda p: init_state(p, tx), out_shardings=target)(params)
    adam = state["opt_state"][1][0]
    for moments in (adam.mu, adam.nu):
        for m, p in zip(jax.tree.leaves(moments), jax.tree.leaves(params), strict=True):
            assert m.sharding.is_equivalent_to(p.sharding, m.ndim)
    emb = adam.mu["embed_tokens"]["embedding"]
    assert emb.addressable_shards[0].data.size == emb.size // 8  # an eighth per device, not a copy
