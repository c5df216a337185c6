"""The attention-mask convention a model was trained with: its record, and how a command resolves it.

Two conventions exist (docs/conventions.md): open-unlearning's, `attention_mask = input_ids != pad`
with pad = eos = `<|eot_id|>`, which also hides every `<|eot_id|>` inside a sequence
(`eot_mask_quirk: true`), and the padding-only mask (`eot_mask_quirk: false`). A model is scored
and trained on with the mask it was trained with, so the convention travels with the model:

- every params checkpoint, training checkpoint and HF export npo-jax writes holds `RECORD_FILE`
  (`npo_jax_model.json`) beside its `config.json`: `{"format": "npo-jax-model", "version": 1,
  "eot_mask_quirk": true|false}`;
- `resolve_eot_mask(explicit, folder)`: an explicit setting wins, else the folder's record, else
  open-unlearning's convention (a model without a record is an HF release such as
  open-unlearning's, all trained with its mask), with one line saying so;
- a `TOFU_EVAL.json` we write holds `{"npo_jax": {"eot_mask_quirk": ...}}` (a key open-unlearning's
  readers and ours skip); a log without it (open-unlearning's) counts as its convention, and
  forget quality against a retain log of the other convention warns (`check_retain_log`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from npo_jax.errors import NpoJaxError
from npo_jax.fs import warn

RECORD_FILE = "npo_jax_model.json"
OPEN_UNLEARNING = True  # the convention of a model or log without a record
LOG_KEY = "npo_jax"  # the TOFU_EVAL.json key holding our own settings


def describe(eot_mask_quirk: bool) -> str:
    return ("open-unlearning's mask (every <|eot_id|> hidden, eot_mask_quirk=true)" if eot_mask_quirk
            else "the padding-only mask (eot_mask_quirk=false)")


def recorded_mask(folder: str | Path) -> bool | None:
    """The `eot_mask_quirk` recorded in `folder`, or None when it has no record."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("eot_mask_quirk")
    except (ValueError, AttributeError):
        value = None
    if not isinstance(value, bool):
        raise NpoJaxError(f"{path}: cannot read the model's mask convention (expected "
                          '{"eot_mask_quirk": true or false}); delete the file to use open-unlearning\'s')
    return value


def write_record(folder: str | Path, eot_mask_quirk: bool) -> Path:
    """Record in `folder` that its model was trained with the `eot_mask_quirk` convention."""
    path = Path(folder) / RECORD_FILE
    path.write_text(json.dumps({"format": "npo-jax-model", "version": 1, "eot_mask_quirk": bool(eot_mask_quirk)},
                               indent=2) + "\n")
    return path


def copy_record(src: str | Path, dst: str | Path) -> bool:
    """Copy `src`'s record to `dst` if it has one (a folder without one stays without: "no record")."""
    value = recorded_mask(src)
    if value is not None:
        write_record(dst, value)
    return value is not None


def resolve_eot_mask(explicit: bool | None, model_folder: str | Path,
                     say: Callable[[str], None] | None = print) -> bool:
    """The convention to use with the model in `model_folder`: `explicit` when set, else its record,
    else open-unlearning's (`say` gets one line saying so; None: silent)."""
    if explicit is not None:
        return bool(explicit)
    recorded = recorded_mask(model_folder)
    if recorded is not None:
        return recorded
    if say is not None:
        say(f"{model_folder}: no {RECORD_FILE} (not trained by npo-jax): using open-unlearning's attention mask "
            "(eot_mask_quirk=true); --no-eot-mask-quirk or data.eot_mask_quirk=false for the padding-only mask")
    return OPEN_UNLEARNING


def mark_log(log: dict, eot_mask_quirk: bool) -> dict:
    """`log` (a TOFU_EVAL.json dict) with the convention its model was scored with."""
    return {**log, LOG_KEY: {**(log.get(LOG_KEY) or {}), "eot_mask_quirk": bool(eot_mask_quirk)}}


def log_mask(log: dict) -> bool:
    """The convention a TOFU_EVAL.json was computed with: ours as recorded, else open-unlearning's."""
    ours = log.get(LOG_KEY)
    value = ours.get("eot_mask_quirk") if isinstance(ours, dict) else None
    return value if isinstance(value, bool) else OPEN_UNLEARNING


def check_retain_log(eot_mask_quirk: bool, retain_log: dict | None, say: Callable[[str], None] = warn) -> bool:
    """Warn when forget quality would compare logs of two conventions; True when they agree."""
    if retain_log is None or log_mask(retain_log) == eot_mask_quirk:
        return True
    source = "" if isinstance(retain_log.get(LOG_KEY), dict) else " (it has no npo_jax record: open-unlearning's)"
    say(f"forget_quality compares two attention-mask conventions: this model is scored with "
        f"{describe(eot_mask_quirk)}, the retain log with {describe(not eot_mask_quirk)}{source}; "
        "the KS test then measures the mask as much as the forgetting")
    return False
