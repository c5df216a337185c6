"""Llama-3.x decoder in Flax NNX, numerically matching `transformers.LlamaForCausalLM`.

Parameter paths mirror HF names (`layers/self_attn/q_proj/kernel`); kernels are the transposes
of torch's `(out, in)` weights. Decoder layers are stacked on a leading layer axis and run under
`jax.lax.scan`, so compile time does not grow with depth. Params are kept in `param_dtype`
(float32 master weights); matmuls run in `compute_dtype`; RMSNorm and softmax in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from npo_jax.config import LlamaConfig
from npo_jax.rope import apply_rope, inverse_frequencies, rope_cos_sin

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class KVCache(NamedTuple):
    """Keys and values of every layer, (layers, batch, kv_heads, slots, head_dim): the layout the
    attention matmuls read, so decoding writes one slot and transposes nothing."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, cfg: LlamaConfig, batch: int, slots: int, dtype) -> KVCache:
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, slots, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def unstacked(self) -> KVCache:
        """A tuple of per-layer arrays in place of each stacked one (for unrolled layers)."""
        return KVCache(*(tuple(c[i] for i in range(c.shape[0])) for c in self))


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return std * jax.random.normal(rngs.params(), shape, dtype)


class LoRADropoutKey(nnx.Variable):
    """A raw PRNG key (uint32[2], per layer when stacked) for a LoRA adapter's input dropout; set by
    the train step for each micro-batch (`npo_jax.lora.LoraModel`), never trained."""


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel (in, out), with optional leading stack axes.

    With `lora` (an `npo_jax.lora.LoraSpec`), PEFT's LoRA layer on top: y += scale *
    (dropout(x) @ lora_a) @ lora_b, lora_a (in, rank) and lora_b (rank, out) float32
    `nnx.LoRAParam`s (the transposes of PEFT's lora_A / lora_B weights), scale = alpha / rank.
    """

    def __init__(self, d_in, d_out, *, use_bias, stack, rngs, param_dtype, compute_dtype, lora=None):
        self.kernel = nnx.Param(_normal(rngs, (*stack, d_in, d_out), param_dtype))
        self.bias = nnx.Param(jnp.zeros((*stack, d_out), param_dtype)) if use_bias else None
        self.compute_dtype = compute_dtype
        on = lora is not None
        self.lora_a = nnx.LoRAParam(jnp.zeros((*stack, d_in, lora.rank), jnp.float32)) if on else None
        self.lora_b = nnx.LoRAParam(jnp.zeros((*stack, lora.rank, d_out), jnp.float32)) if on else None
        self.lora_key = LoRADropoutKey(jnp.zeros((*stack, 2), jnp.uint32)) if on and lora.dropout > 0 else None
        self.lora_scale, self.lora_dropout = (lora.alpha / lora.rank, lora.dropout) if on else (0.0, 0.0)

    def __call__(self, x):
        cd = self.compute_dtype
        y = _matmul_2d(x.astype(cd), self.kernel[...].astype(cd))
        if self.bias is not None:
            y = y + self.bias[...].astype(cd)
        if self.lora_a is not None:
            y = y + self._lora(x)
        return y

    def _lora(self, x):
        """PEFT's `lora_B(lora_A(dropout(x))) * scaling`, in compute dtype."""
        cd = self.compute_dtype
        if self.lora_key is not None:
            keep = jax.random.bernoulli(self.lora_key[...], 1.0 - self.lora_dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.lora_dropout), jnp.zeros((), x.dtype))
        h = _matmul_2d(x.astype(cd), self.lora_a[...].astype(cd))
        return _matmul_2d(h, self.lora_b[...].astype(cd)) * jnp.asarray(self.lora_scale, cd)


def _matmul_2d(x, w, **kwargs):
    """x (..., d) @ w (d, n) with the leading axes folded into one (a free reshape).

    The weight gradient then contracts one axis instead of (batch, time): XLA:CPU emits the
    latter as transposing copies, about 1.5x slower forward + backward for a stack of MLPs
    (`scripts/bench_mlp_layout.py`)."""
    return jnp.dot(x.reshape(-1, x.shape[-1]), w, **kwargs).reshape(*x.shape[:-1], w.shape[-1])


class RMSNorm(nnx.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim, *, eps, stack, param_dtype):
        self.scale = nnx.Param(jnp.ones((*stack, dim), param_dtype))
        self.eps = eps

    def __call__(self, x):
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * h.astype(x.dtype)


def _lora_for(lora, name):
    """The LoRA spec if projection `name` is one of its targets, else None."""
    return lora if lora is not None and name in lora.targets else None


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, stack, rngs, param_dtype, compute_dtype, lora=None):
        kw = dict(use_bias=cfg.attention_bias, stack=stack, rngs=rngs, param_dtype=param_dtype,
                  compute_dtype=compute_dtype)
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, h * d, lora=_lora_for(lora, "q_proj"), **kw)
        self.k_proj = Linear(cfg.hidden_size, kv * d, lora=_lora_for(lora, "k_proj"), **kw)
        self.v_proj = Linear(cfg.hidden_size, kv * d, lora=_lora_for(lora, "v_proj"), **kw)
        self.o_proj = Linear(h * d, cfg.hidden_size, lora=_lora_for(lora, "o_proj"), **kw)
        self.num_kv_heads, self.num_groups, self.head_dim = kv, cfg.num_query_groups, d

    def __call__(self, x, cos, sin, mask, kv_cache, cache_index):
        b, t, _ = x.shape
        kvh, g, d = self.num_kv_heads, self.num_groups, self.head_dim
        q = apply_rope(self.q_proj(x).reshape(b, t, kvh * g, d), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, kvh, d), cos, sin).transpose(0, 2, 1, 3)  # (b, kvh, t, d)
        v = self.v_proj(x).reshape(b, t, kvh, d).transpose(0, 2, 1, 3)
        if kv_cache is not None:
            k_all, v_all = kv_cache
            kv_cache = k_new, v_new = k.astype(k_all.dtype), v.astype(v_all.dtype)
            k = jax.lax.dynamic_update_slice(k_all, k_new, (0, 0, cache_index, 0))
            v = jax.lax.dynamic_update_slice(v_all, v_new, (0, 0, cache_index, 0))
        # Grouped-query attention without repeating K/V: the g query heads that share a KV head
        # (HF's repeat_kv order) are stacked along the query axis, so each (batch, KV head) is
        # one (g*t, d) x (d, s) matmul; on XLA:CPU this runs 1.2-1.8x faster than a 5-d einsum.
        s = k.shape[2]
        q = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        scores = jnp.einsum("bkmd,bksd->bkms", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
        scores = jnp.where(mask[:, None, None, :, :], scores.reshape(b, kvh, g, t, s), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b, kvh, g * t, s)
        out = jnp.einsum("bkms,bksd->bkmd", probs, v).reshape(b, kvh, g, t, d)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, kvh * g * d)
        return self.o_proj(out), kv_cache  # with a cache: this call's keys and values only


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, stack, rngs, param_dtype, compute_dtype, lora=None):
        kw = dict(use_bias=cfg.mlp_bias, stack=stack, rngs=rngs, param_dtype=param_dtype,
                  compute_dtype=compute_dtype)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, lora=_lora_for(lora, "gate_proj"), **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, lora=_lora_for(lora, "up_proj"), **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, lora=_lora_for(lora, "down_proj"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """One decoder layer; built with `stack=(num_layers,)` it holds all layers' params."""

    def __init__(self, cfg: LlamaConfig, *, stack, rngs, param_dtype, compute_dtype, lora=None):
        kw = dict(stack=stack, rngs=rngs, param_dtype=param_dtype, compute_dtype=compute_dtype, lora=lora)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, stack=stack,
                                       param_dtype=param_dtype)
        self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, stack=stack,
                                                param_dtype=param_dtype)
        self.mlp = MLP(cfg, **kw)

    def __call__(self, x, cos, sin, mask, kv_cache, cache_index):
        attn, kv_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, cache_index)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv_cache


class Embed(nnx.Module):
    """Token embedding; like torch's `nn.Embedding(padding_idx=pad_token_id)` in HF, the pad
    token's row gets no gradient."""

    def __init__(self, vocab, dim, *, rngs, param_dtype, pad_id=None):
        self.embedding = nnx.Param(_normal(rngs, (vocab, dim), param_dtype))
        self.pad_id = pad_id

    def __call__(self, ids):
        x = jnp.take(self.embedding[...], ids, axis=0)
        if self.pad_id is not None:
            x = jnp.where((ids == self.pad_id)[..., None], jax.lax.stop_gradient(x), x)
        return x


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 compute_dtype=jnp.float32, remat: str = "none", lora=None):
        """`lora`: an `npo_jax.lora.LoraSpec` puts adapters on its target projections of every layer."""
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
        self.config = cfg
        self.compute_dtype = compute_dtype
        self.remat = remat
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, param_dtype=param_dtype,
                                  pad_id=cfg.pad_token_id)
        self.layers = DecoderLayer(cfg, stack=(cfg.num_hidden_layers,), rngs=rngs,
                                   param_dtype=param_dtype, compute_dtype=compute_dtype, lora=lora)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, stack=(), param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, use_bias=False, stack=(), rngs=rngs, param_dtype=param_dtype,
            compute_dtype=compute_dtype)

    def hidden_states(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None,
                      cache_index=0, layers: list | None = None, stop_after: int | None = None):
        """Final-norm hidden states (batch, seq, hidden) in compute dtype, and the updated cache.

        Without a cache, `attention_mask` (batch, seq) marks real tokens and positions default
        to `cumsum(mask) - 1`, so left and right padding both match HF. With a cache,
        `attention_mask` covers all cache slots (batch, slots), the new tokens are written at
        `cache_index`, and `positions` must be given.

        `layers` (from `unstacked_layers`, with a cache from `KVCache.unstacked`) runs the layers
        unrolled instead of scanned: what a decode loop wants, see `unstacked_layers`.
        `stop_after` k (no cache): the residual stream after layer k instead (HF's output of
        `model.layers.k`, no final norm); the scan runs over layers 0..k only.
        """
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t if cache is None else cache.k.shape[3]), jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required when decoding with a cache")
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
        query_slots = cache_index + jnp.arange(t)
        key_slots = jnp.arange(attention_mask.shape[-1])
        mask = (key_slots[None, :] <= query_slots[:, None])[None] & (attention_mask[:, None, :] > 0)
        cos, sin = rope_cos_sin(jnp.asarray(inverse_frequencies(self.config)), positions)

        x = self.embed_tokens(input_ids).astype(self.compute_dtype)
        graphdef, layer_state = nnx.split(self.layers)
        if stop_after is not None:
            layer_state = jax.tree.map(lambda w: w[:stop_after + 1], layer_state)

        def body(h, xs):
            state, kv = xs
            layer = nnx.merge(graphdef, state)
            return layer(h, cos, sin, mask, kv, cache_index)

        if layers is not None:  # unrolled: per-layer params and caches, each written in place
            new_k, new_v = [], []
            for i, state in enumerate(layers):
                x, kv_new = body(x, (state, None if cache is None else (cache.k[i], cache.v[i])))
                if cache is not None:
                    new_k.append(jax.lax.dynamic_update_slice(cache.k[i], kv_new[0], (0, 0, cache_index, 0)))
                    new_v.append(jax.lax.dynamic_update_slice(cache.v[i], kv_new[1], (0, 0, cache_index, 0)))
            return self.norm(x), None if cache is None else KVCache(tuple(new_k), tuple(new_v))
        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        kv_in = None if cache is None else (cache.k, cache.v)
        x, kv_new = jax.lax.scan(body, x, (layer_state, kv_in))
        if stop_after is not None:
            return x, None
        # the layers return only the new slots, written here into the stacked cache: stacking
        # every layer's whole cache as the scan's output would copy all of it per decode step
        new_cache = None if cache is None else KVCache(*(
            jax.lax.dynamic_update_slice(c, n, (0, 0, 0, cache_index, 0)) for c, n in zip(cache, kv_new, strict=True)))
        return self.norm(x), new_cache

    def unstacked_layers(self) -> list:
        """Each layer's params as arrays of their own, for `hidden_states(layers=...)`.

        A loop that runs the scanned layers once per token (decoding) slices every layer's
        weights out of the stack on every step, and XLA:CPU copies each slice: a quarter of a
        small model's decode step. Unstacked once before the loop, the weights are read in place."""
        _, state = nnx.split(self.layers)
        return [jax.tree.map(lambda x, i=i: x[i], state) for i in range(self.config.num_hidden_layers)]

    def logits(self, h):
        """float32 logits from hidden states (any leading shape)."""
        if self.lm_head is None:
            w = self.embed_tokens.embedding[...].astype(self.compute_dtype)
            return _matmul_2d(h.astype(self.compute_dtype), w.T, preferred_element_type=jnp.float32)
        w = self.lm_head.kernel[...].astype(self.compute_dtype)
        return _matmul_2d(h.astype(self.compute_dtype), w, preferred_element_type=jnp.float32)

    def __call__(self, input_ids, attention_mask=None, positions=None):
        h, _ = self.hidden_states(input_ids, attention_mask, positions)
        return self.logits(h)


def abstract_model(cfg: LlamaConfig, **kwargs) -> LlamaForCausalLM:
    """The model with ShapeDtypeStruct leaves: no memory, for shapes and restore targets."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0), **kwargs))


def split_params(model: LlamaForCausalLM):
    """(graphdef, params as a plain nested dict): what crosses jit, Orbax and the converters."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def merge_params(graphdef, params) -> LlamaForCausalLM:
    return nnx.merge(graphdef, params)


def train_hidden(model, input_ids, attention_mask):
    """Hidden states of a right-padded training batch with positions 0..L-1, as HF's forward uses
    without position_ids: padding (and eot tokens the quirk mask hides) keep arange positions."""
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    return model.hidden_states(input_ids, attention_mask, positions)[0]


def train_layer_output(model, input_ids, attention_mask, layer: int):
    """`train_hidden`'s residual stream after decoder layer `layer` (HF's output of
    `model.layers.{layer}`), computing no layer above it."""
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    return model.hidden_states(input_ids, attention_mask, positions, stop_after=layer)[0]
