"""Unlearning methods, one module each, by open-unlearning's trainer name (`method.name`).

A method module has NAME; HPARAMS, the `method.*` keys it reads with its default (open-unlearning's
`method_args` defaults; `retain_loss` is open-unlearning's `retain_loss_type`); RETAIN, whether it
adds `alpha *` a retain term (NLL or KL, `npo_jax.losses`); FORGET_GROUPS, the batch groups its
loss scores; REFERENCE_GROUPS, those whose frozen-reference log-probs it needs; optionally
TEACHER_GROUPS, those whose frozen reference's full-vocabulary logits it needs (a live reference
forward: `Scored.teacher_per_token`); and
`forget_loss(scored, objective)`, its forget term per unit (`npo_jax.methods.common.Scored`).
Modules load on first use (`get`), so the config schema can name the methods without importing
JAX. The trainer loop never sees a method: `npo_jax.losses.objective_loss` runs the one shared forward
and calls the module.

A method with training state (PDU's dual variable) also has `initial_state(objective)` (a dict of
scalars, kept in the train state under "method", checkpointed with it), `total_loss(forget,
retain, objective, state, order)` (per-unit losses and the state after the micro-batch, whose
values the step also records as metrics; `order`: `common.UnitOrder`), and `epoch_end(objective, state, epochs_done,
retain_mean)` (the state after an epoch; `retain_mean()` runs a no-gradient pass over the epoch's
retain batches). A hyperparameter whose default is REQUIRED must be set by the config.
Optional: RETAIN_LOSSES, the `retain_loss` values it accepts (default NLL, KL); `objective(model,
ref_model, batch, obj, units, span)`, its whole loss in place of the shared forward (RMU scores
activations, not label log-probs); `prepare(obj, model_config, method_config, seed)` ->
(objective, optimizer update mask or None), called once the model is known; `write_run_files(obj,
out)`, what the run folder keeps of it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from npo_jax.errors import NpoJaxError

# open-unlearning trainer name -> module under npo_jax.methods; IdkDPO: open-unlearning's name
# for DPO on TOFU's refusals (docs/methods.md)
REGISTRY = {"NPO": "npo", "SimNPO": "simnpo", "GradAscent": "grad_ascent", "GradDiff": "grad_diff", "DPO": "dpo",
            "IdkDPO": "dpo", "WGA": "wga", "SatImp": "satimp",
            "CEU": "ceu", "UNDIAL": "undial", "PDU": "pdu", "RMU": "rmu"}
NAMES = tuple(REGISTRY)
REQUIRED = "???"  # an HPARAMS default that the config must replace (open-unlearning's `???`)
FINETUNE = "finetune"  # the `npo-jax finetune` objective: a module, not a method.name


def get(name: str) -> ModuleType:
    """The module of an unlearning method, or of "finetune"."""
    if name != FINETUNE and name not in REGISTRY:
        raise NpoJaxError(f"method.name={name!r} is not a method; choose from {', '.join(NAMES)}")
    return importlib.import_module(f"npo_jax.methods.{REGISTRY.get(name, name)}")
