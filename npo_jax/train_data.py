"""The tokenized examples a run trains on, and the NPO reference log-probs of the forget set.

`TrainData.examples` is what an epoch passes over: the forget split when unlearning, the
fine-tuning split (`data.finetune_split`) when fine-tuning. `retain` and `pairing` (each
example's retain partner) are there only for objectives with a retain term. The trainer turns
these into step batches (`npo_jax.data.batches.step_batch`), whose group of training examples
the compiled step sees under the key "forget" whatever the mode (`npo_jax.losses`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from npo_jax import distributed
from npo_jax.data.batches import RetainPairing
from npo_jax.data.refusals import Refusals, load_refusals
from npo_jax.data.tofu import load_split
from npo_jax.data.tokenize import ChatFormat, Example, encode_qa_pairs, load_tokenizer, pad_token_id
from npo_jax.reference import cache_key, cached_reference_logprobs, reference_logprobs
from npo_jax.run_config import RunConfig


@dataclasses.dataclass(frozen=True)
class TrainData:
    examples: list[Example]  # the forget split (unlearn) or the fine-tuning split (finetune)
    retain: list[Example] | None  # the retain split, for objectives with a retain term
    pairing: RetainPairing | None  # the retain partner of each example (in each epoch)
    pad_id: int
    eot_id: int
    truncated: dict[str, int]  # split -> examples cut to data.max_length
    refusals: Refusals | None = None  # DPO's "alternate" answers to the forget questions

    def step_tokens(self, epochs: np.ndarray, indices: np.ndarray) -> int:
        """Non-padding tokens of the step that uses `indices` in `epochs` (with their retain partners
        and refusals)."""
        tokens = sum(len(self.examples[i].input_ids) for i in indices)
        if self.retain is not None:
            tokens += sum(len(self.retain[j].input_ids) for j in self.pairing.partners(indices, epochs))
        if self.refusals is not None:
            tokens += sum(len(e.input_ids) for e in self.refusals.examples(indices, epochs))
        return tokens


def _tokenize_split(tokenizer, rows, fmt: ChatFormat, max_length: int):
    examples = encode_qa_pairs(tokenizer, [(r["question"], r["answer"]) for r in rows], fmt, max_length)
    return examples, sum(e.truncated for e in examples)


def load_train_data(cfg: RunConfig, mode: str, with_retain: bool, cache: Path, with_refusals: bool = False
                    ) -> TrainData:
    """The splits `mode` ("unlearn" or "finetune") trains on, tokenized in the chat format; with
    `with_refusals`, DPO's refusals (`data.idk_path`) for the forget questions."""
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    fmt = ChatFormat(cfg.data.system_prompt, cfg.data.date_string)
    tfds_dir = cfg.data.tfds_dir or (cache / "tfds")

    def tokenized(split: str):
        return _tokenize_split(tokenizer, load_split(split, cfg.data.dir, tfds_dir), fmt, cfg.data.max_length)

    split = cfg.data.finetune_split if mode == "finetune" else cfg.data.forget_split
    rows = load_split(split, cfg.data.dir, tfds_dir)
    examples, n_truncated = _tokenize_split(tokenizer, rows, fmt, cfg.data.max_length)
    truncated = {split: n_truncated}
    retain = pairing = None
    if with_retain:
        retain, truncated[cfg.data.retain_split] = tokenized(cfg.data.retain_split)
        pairing = RetainPairing(len(examples), len(retain), cfg.seed, cfg.data.retain_pairing)
    refusals = Refusals([r["question"] for r in rows], load_refusals(cfg.data.idk_path), tokenizer, fmt,
                        cfg.data.max_length, cfg.seed) if with_refusals else None
    return TrainData(examples, retain, pairing, pad_token_id(tokenizer), tokenizer.eos_token_id, truncated, refusals)


def forget_reference_logprobs(cfg: RunConfig, data: TrainData, graphdef, params, cache: Path, out: Path) -> np.ndarray:
    """The starting model's summed log-prob of each forget example, from the cache or computed
    (and cached); the primary also keeps a copy in the run folder."""
    compute = cfg.model.compute_dtype
    if cfg.lora.rank and cfg.lora.base_dtype != "float32":  # the base model is rounded: other log-probs
        compute = f"{compute}+base:{cfg.lora.base_dtype}"
    key = cache_key(cfg.model.path, data.examples, compute_dtype=compute, eot_mask_quirk=cfg.data.eot_mask_quirk)

    def compute():
        return reference_logprobs(graphdef, params, data.examples, buckets=cfg.data.length_buckets,
                                 pad_id=data.pad_id, eot_id=data.eot_id, eot_mask_quirk=cfg.data.eot_mask_quirk)

    folder = cache / "reference_logprobs"
    # compute() is a collective on several hosts: if any host lacks the file (per-host caches,
    # a replaced host), all compute; cached_reference_logprobs names files KEY.npy
    have = (folder / f"{key}.npy").is_file()
    if distributed.any_process(not have) and have:
        values = compute()
    else:
        values, _ = cached_reference_logprobs(folder, key, compute)
    if distributed.is_primary():
        np.save(out / "reference_logprobs.npy", values)
    return values
