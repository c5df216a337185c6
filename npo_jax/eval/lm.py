"""The model handle evaluation and the audit run on: weights, tokenizer and the model's conventions.

`LoadedLM` holds what travels with a model rather than with a way of scoring it: the graph and
params, the tokenizer and chat format its text is encoded with, the attention-mask convention it
was trained with (`eot_mask_quirk`, open-unlearning's mask that also hides every <|eot_id|>), and
the ids that end or pad a generation. `with_params` gives the same model with other weights (the
audit's relearned copy).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from npo_jax.data.batches import bucket_length, pad_examples
from npo_jax.data.tokenize import ChatFormat, Example, pad_token_id
from npo_jax.model import merge_params


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedLM:
    graphdef: object
    params: object
    tokenizer: object
    fmt: ChatFormat = ChatFormat()
    eot_mask_quirk: bool = False
    # decoding copies the layers' weights out of their stack once (faster steps); False reads them
    # in place (no second copy of the layers: `npo-jax parity` on a 3B in float32 on a CPU host)
    unstacked_decode: bool = True

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    @functools.cached_property
    def eos_ids(self) -> tuple:
        """What ends a generated answer: the tokenizer's eos and the model config's (read once:
        the config comes from merging the params on the host)."""
        cfg = merge_params(self.graphdef, self.params).config
        return tuple(sorted({self.tokenizer.eos_token_id, *cfg.eos_token_ids}))

    def with_params(self, params) -> LoadedLM:
        """The same model, tokenizer and conventions with other weights."""
        return dataclasses.replace(self, params=params)

    def text(self, tokens: np.ndarray) -> str:
        """Generated tokens as an answer: special tokens skipped, stripped."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def pad(self, examples: list[Example], buckets) -> dict[str, np.ndarray]:
        """Right padded to the bucket of the longest, with the model's mask convention."""
        length = bucket_length(max(len(e.input_ids) for e in examples), list(buckets))
        return pad_examples(examples, length, self.pad_id, self.tokenizer.eos_token_id, self.eot_mask_quirk)
