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

_initialized = False


def maybe_initialize() -> None:
    global _initialized
    if _initialized:
        return
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
        _initialized = True
    elif env.get("NPO_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()  # cluster auto-detection (TPU pod, SLURM, ...)
        _initialized = True


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
