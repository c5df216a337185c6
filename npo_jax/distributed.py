"""Multi-host start-up: `jax.distributed.initialize` when the environment says there are several
processes; nothing on a single host.

On Cloud TPU pods and SLURM, JAX detects the cluster itself (`NPO_JAX_DISTRIBUTED=1` asks for
that). Elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
JAX_PROCESS_ID on every process.
"""

from __future__ import annotations

import os

import jax

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
