"""The dtype names a config or a command line may give, and the dtype each stands for (numpy and
JAX share them: `jnp.bfloat16` is ml_dtypes' bfloat16)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from npo_jax.errors import NpoJaxError

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def dtype(name: str, what: str = "dtype") -> np.dtype:
    """The dtype called `name`; an error naming `what` (the field or flag) for any other name."""
    if name not in DTYPES:
        raise NpoJaxError(f"{what}: unsupported dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]
