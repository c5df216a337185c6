"""`npo-jax parity MODEL`: JAX against transformers on the user's own weights.

Core pieces, run by the command (`npo_jax.parity_run`, application layer: it converts):
- `checks`: the tolerances (the parity tests'), check results, comparisons, the table;
- `inputs`: the N TOFU items, tokenized and padded as both frameworks get them;
- `jax_side`: what our code computes on them, kept (logits on disk) once the JAX model is freed;
- `torch_side`: the same in transformers / PyTorch, compared as it goes;
- `torch_objective`: open-unlearning's loss formulas in PyTorch (also the loss tests' reference);
- `args`: the command's arguments.
"""
