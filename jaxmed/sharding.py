"""Device mesh and sharding by logical axis names: one table for every model.

The mesh has three axes: ``data`` (pure data parallelism: parameters replicated), ``fsdp``
(data parallelism with parameters, gradients and optimizer state sharded over it) and
``tensor`` (attention heads / MLP width split across devices). Every parameter of jaxmed's
models carries logical names (`jaxmed.models.layers`); `LOGICAL_RULES` maps them to mesh
axes. A dimension that a mesh axis does not divide evenly stays replicated, so the same
rules work from 1 CPU to a pod slice (e.g. SD's 4-channel conv_in on an 8-way fsdp axis).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmed.strategies.base import flatten, unflatten

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or axes). Order matters: the first rule naming a free mesh
# axis wins, and a mesh axis is used at most once per array.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("height", None),
    ("width", None),
    ("channels", None),
    # parameters
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("conv_in", None),
    ("conv_h", None),
    ("conv_w", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 (the remaining devices). The
    devices are laid out for the interconnect (`device_grid`)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} "
                         f"tensor={tensor}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise ValueError(f"mesh: {n} devices are not divisible by {known} "
                             f"(data={data} fsdp={fsdp} tensor={tensor})")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh: data x fsdp x tensor = {sizes[0]}x{sizes[1]}x{sizes[2]} = "
            f"{math.prod(sizes)} but {n} devices are available; set config.mesh so the "
            "product equals the device count (one axis may be -1)"
        )
    return Mesh(device_grid(devices, sizes), MESH_AXES)


def num_slices(devices: Sequence[jax.Device]) -> int:
    """How many TPU slices ``devices`` span (their ``slice_index``; 1 where devices have
    none: CPUs, GPUs, one slice)."""
    return len({getattr(d, "slice_index", None) or 0 for d in devices})


def device_grid(devices: Sequence[jax.Device], sizes: Sequence[int]) -> np.ndarray:
    """``devices`` as an array of shape ``sizes`` (data, fsdp, tensor), laid out for the
    interconnect: `mesh_utils.create_device_mesh` maps the axes onto the TPU torus so that
    the last (most communicating) axes run between neighbouring chips. Devices spanning
    several slices (multislice, joined by the slower data-centre network) get a hybrid mesh
    in which only the data axis crosses slices: its gradient all-reduce is the one
    collective per step, while fsdp gathers and tensor-parallel traffic stay inside a slice."""
    devices = list(devices)
    sizes = tuple(int(s) for s in sizes)
    slices = num_slices(devices)
    if slices > 1:
        if sizes[0] % slices:
            raise ValueError(
                f"mesh: the {len(devices)} devices span {slices} TPU slices and only the data "
                f"axis may cross slices, so data ({sizes[0]}) must be a multiple of {slices}; "
                f"set config.mesh.data (or -1) accordingly")
        return mesh_utils.create_hybrid_device_mesh(
            (sizes[0] // slices, *sizes[1:]), (slices, 1, 1), devices,
            allow_split_physical_axes=True)
    try:
        return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as err:
        # mesh_utils knows the physical layouts of whole TPU slices (on CPUs and GPUs it
        # reshapes, sorting GPUs by id); for device sets it cannot map onto the torus (a
        # part of a slice, an odd chip count) the order of `devices` is as good a guess.
        log.info("mesh: no interconnect-aware layout for %d %s devices as %s (%s); using "
                 "their order", len(devices), devices[0].device_kind, sizes, err)
        return np.asarray(devices).reshape(sizes)


def _mesh_axes_for(name: str | None, rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    return ()


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=LOGICAL_RULES
) -> PartitionSpec:
    """PartitionSpec for an array with logical dim names, replicating dims that a mesh axis
    would not divide evenly and never using one mesh axis twice."""
    used: set[str] = set()
    out: list[Any] = []
    for name, dim in zip(names, shape):
        axes = tuple(a for a in _mesh_axes_for(name, rules)
                     if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes) if axes else 1
        if not axes or dim % size:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def param_specs(boxed_variables: Mapping, mesh: Mesh, rules=LOGICAL_RULES) -> dict:
    """{path tuple: PartitionSpec} for a tree of nn.LogicallyPartitioned (abstract) params."""
    logical = nn.get_partition_spec(boxed_variables)
    shapes = nn.meta.unbox(boxed_variables)
    flat_l = flatten(logical)
    flat_s = flatten(shapes)
    return {p: logical_to_spec(tuple(flat_l[p]) if flat_l[p] is not None else (None,) *
                               len(flat_s[p].shape), flat_s[p].shape, mesh, rules)
            for p in flat_s}


def fallback_spec(shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """For leaves with no logical names (adapters, SVD factors): shard the largest dim the
    fsdp axis divides if the array is large, else replicate."""
    n = mesh.shape["fsdp"]
    if n == 1 or math.prod(shape) < 2**16:
        return PartitionSpec()
    dims = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in dims:
        if shape[i] % n == 0:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def tree_shardings(tree: Any, mesh: Mesh, specs: Mapping[tuple, PartitionSpec]) -> Any:
    """NamedShardings for ``tree`` (a nested dict whose top level are component names):
    leaves at a known parameter path with the same shape take its spec, others fall back."""
    flat = flatten(tree)
    out = {}
    for path, leaf in flat.items():
        spec = specs.get(path)
        shape = tuple(getattr(leaf, "shape", ()))
        if spec is None or len(spec) > len(shape) or not _fits(spec, shape, mesh):
            spec = fallback_spec(shape, mesh)
        out[path] = NamedSharding(mesh, spec)
    return unflatten(out)


def _fits(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> bool:
    for axes, dim in zip(spec, shape):
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else axes
        if dim % math.prod(mesh.shape[a] for a in axes):
            return False
    return True


def batch_sharding(mesh: Mesh, ndim: int, leading: int = 0) -> NamedSharding:
    """Shard axis ``leading`` of a batch over data x fsdp; the rest replicated."""
    spec = [None] * ndim
    spec[leading] = BATCH_AXES
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put(tree: Any, shardings: Any) -> Any:
    """Host arrays -> global jax Arrays with ``shardings`` (works multi-host: each process
    supplies the shards it addresses)."""
    def one(x, sh):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])
    return jax.tree_util.tree_map(one, tree, shardings)


def to_host(tree: Any) -> Any:
    """Numpy copies of a tree of (possibly sharded) global arrays, whole on every process.
    With several processes it is a collective: every process must call it. Leaf by leaf,
    so at most one gathered leaf is on the devices at a time."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def axis_rules():
    """Context manager activating `LOGICAL_RULES` for nn.with_logical_constraint. Alone it
    changes nothing: flax also needs a mesh set with ``jax.set_mesh`` (the deprecated
    ``with mesh:`` is not enough); `activation_sharding` enters both."""
    return nn.logical_axis_rules(list(LOGICAL_RULES))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh) -> Iterator[None]:
    """While active, `jaxmed.models.layers.constrain` shards activations by their logical
    names (the batch axis over data x fsdp); outside it, constrain is a no-op. It acts when
    a function is traced, so it must be active at a jitted function's first call (or its
    ``.lower``), e.g. around the train step and the sampling function. On a one-device
    mesh there is nothing to shard, so it enters nothing and the program stays as it was."""
    if mesh.devices.size == 1:
        yield
        return
    with jax.set_mesh(mesh), axis_rules():
        yield
