"""Multi-host start-up: `jax.distributed.initialize` when the environment says there are several
processes; nothing on a single host. Plus the two agreements the trainer needs between hosts.

On Cloud TPU pods and SLURM, JAX detects the cluster itself (`NPO_JAX_DISTRIBUTED=1` asks for
that). Elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
JAX_PROCESS_ID on every process. On CPU, cross-process collectives use gloo (JAX's default).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from npo_jax.errors import NpoJaxError

_initialized = False


def maybe_initialize() -> None:
    global _initialized
    if _initialized:
        return
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env and _env_int("JAX_NUM_PROCESSES", 1) > 1:
        n = _env_int("JAX_NUM_PROCESSES")
        process_id = _env_int("JAX_PROCESS_ID")
        if not 0 <= process_id < n:
            raise NpoJaxError(f"JAX_PROCESS_ID={process_id}: must be 0 to {n - 1} (JAX_NUM_PROCESSES={n})")
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=n,
                                   process_id=process_id)
        _initialized = True
    elif env.get("NPO_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()  # cluster auto-detection (TPU pod, SLURM, ...)
        _initialized = True


def _env_int(name: str, default: int | None = None) -> int:
    """An integer environment variable of the multi-host set-up; missing or malformed is an error
    saying what to set (JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES > 1 asks for all three)."""
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    if text is None or not text.strip().isdigit():
        got = "is not set" if text is None else f"is {text!r}, not a whole number"
        raise NpoJaxError(f"{name} {got}: with JAX_COORDINATOR_ADDRESS (host:port of process 0), every process "
                          "needs JAX_NUM_PROCESSES (how many there are) and JAX_PROCESS_ID (its own number), e.g. "
                          "JAX_NUM_PROCESSES=2 on both hosts, JAX_PROCESS_ID=0 on the first and 1 on the second")
    return int(text)


def is_primary() -> bool:
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (a collective: every process must call it).

    Used so that all hosts act alike on a local event: a SIGTERM delivered to one host, a cache
    file one host lacks, a checkpoint that failed its check on the primary.
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def barrier(name: str) -> None:
    """Wait until every process gets here (nothing on one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
