"""Partition rules for params over a ("data", "fsdp", "tensor") mesh, keyed by parameter path.

Weights are split along their input dimension over `fsdp` and their output dimension over
`tensor` (Megatron-style: column-parallel q/k/v/gate/up, row-parallel o/down). A dimension that
an axis does not divide evenly stays unsplit on that axis, so every config maps onto every mesh.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from npo_jax.config import LlamaConfig
from npo_jax.params import param_specs, stored_shape
from npo_jax.tree_paths import set_path

MESH_AXES = ("data", "fsdp", "tensor")
_ROW_PARALLEL = ("o_proj", "down_proj")


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A mesh over the first data x fsdp x tensor devices (all of them when the sizes multiply up)."""
    devices = jax.devices() if devices is None else devices
    need = data * fsdp * tensor
    if need < 1 or need > len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {need} devices, "
                         f"have {len(devices)}")
    return Mesh(np.asarray(devices[:need]).reshape(data, fsdp, tensor), MESH_AXES)


def _logical_axes(path: tuple[str, ...]) -> tuple:
    """Mesh axis per dimension (without the layer axis) for the parameter at `path`."""
    name, leaf = path[-2], path[-1]
    if path[0] == "embed_tokens":
        return ("tensor", "fsdp")  # (vocab, hidden)
    if path[0] == "lm_head":
        return ("fsdp", "tensor")  # (hidden, vocab)
    if leaf == "kernel":
        return ("tensor", "fsdp") if name in _ROW_PARALLEL else ("fsdp", "tensor")
    if leaf == "bias":
        return (None,) if name in _ROW_PARALLEL else ("tensor",)
    return (None,)  # norm scales: small, replicated


def param_partition_specs(cfg: LlamaConfig, mesh: Mesh) -> dict:
    """Nested dict of PartitionSpec matching the param tree."""
    out: dict = {}
    for spec in param_specs(cfg):
        axes = list(_logical_axes(spec.path))
        shape = spec.shape
        for i, axis in enumerate(axes):
            if axis is not None and shape[i] % mesh.shape[axis]:
                axes[i] = None
        if spec.stacked:
            axes = [None, *axes]
        assert len(axes) == len(stored_shape(spec, cfg))
        set_path(out, spec.path, PartitionSpec(*axes))
    return out


def param_shardings(cfg: LlamaConfig, mesh: Mesh) -> dict:
    return jax.tree.map(lambda p: NamedSharding(mesh, p), param_partition_specs(cfg, mesh),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))
