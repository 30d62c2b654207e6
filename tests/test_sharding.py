"""Meshes laid out for the interconnect, and activation sharding:
`sharding.activation_sharding` makes `layers.constrain` act.

Without the context the layers' logical constraints are no-ops (flax needs both the rules
and a mesh set with `jax.set_mesh`); inside it, a tiny UNet lowered on an 8-device
('data', 'fsdp', 'tensor') mesh carries a sharding constraint on its activations' batch
axis, and computes the same output. Runs in a fresh interpreter on 8 simulated devices.
"""

import importlib.util

import numpy as np
import pytest

from jaxmed import plan_topologies, sharding
from tests.helpers import run_on_8_cpu_devices

SCRIPT = r"""
import re
import jax, jax.numpy as jnp, numpy as np
from jaxmed import sharding
from jaxmed.models import tiny
from jaxmed.models.unet import UNet2DConditionModel, abstract_params, dummy_inputs

cfg = tiny.configs("test", image_size=32)["unet"]
model = UNet2DConditionModel(cfg)
sample, t, ctx = dummy_inputs(cfg, batch=8, height=8, width=8)
sample = jax.random.normal(jax.random.PRNGKey(1), sample.shape)
params = model.init(jax.random.PRNGKey(0), sample, t, ctx)["params"]
fwd = jax.jit(lambda p, x: model.apply({"params": p}, x, t, ctx))

def constraints(text):
    # Sharding constraints in the lowered module (StableHLO's custom call / sharding attr).
    return len(re.findall(r"@Sharding|sdy\.sharding_constraint", text))

mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1)
# CPU devices have no torus: the mesh keeps jax.devices()' order (process-major), which
# the multi-process == one-process parity of tests/test_multiprocess.py relies on.
assert (mesh.devices == np.asarray(jax.devices()).reshape(2, 4, 1)).all()
outside = fwd.lower(params, sample).as_text()
assert constraints(outside) == 0, "constraints outside the context"
with sharding.activation_sharding(mesh):
    inside = fwd.lower(params, sample).as_text()
    out = fwd(params, sample)
n = constraints(inside)
assert n >= 10, f"only {n} activation constraints inside the context"
# The batch axis is split over data x fsdp: 8 images -> 1 per device.
shard_shapes = {s.data.shape for s in out.addressable_shards}
assert shard_shapes == {(1, 8, 8, 4)}, shard_shapes
ref = model.apply({"params": params}, sample, t, ctx)
np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)

# A one-device mesh enters nothing: the program is the one without constraints.
one = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
with sharding.activation_sharding(one):
    assert constraints(fwd.lower(params, sample).as_text()) == 0
print("OK", n)
"""


def test_activation_constraints_apply_inside_the_context():
    run_on_8_cpu_devices(SCRIPT)


HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _tpu_devices(name: str, slices: int) -> list:
    """A TPU topology's devices (compile-only, no TPU attached), ``slices`` slices of it."""
    from jax.experimental import topologies

    topo = plan_topologies.get(name)
    plan_topologies.prepare_environment(topo)
    return list(topologies.get_topology_desc(
        platform="tpu", topology_name=topo.topology, chip_config_name=topo.chip_config,
        chips_per_host_bounds=topo.host_bounds, num_slices=slices, wrap=topo.wrap).devices)


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed: no TPU topology devices")
def test_mesh_follows_the_tpu_torus_and_only_data_crosses_slices():
    devs = _tpu_devices("v5e-16", 1)  # a 4x4 grid of chips
    ring = sharding.make_mesh(data=1, fsdp=16, tensor=1, devices=devs).devices.ravel()

    def hops(order):
        return [sum(abs(a - b) for a, b in zip(order[i].coords, order[(i + 1) % 16].coords))
                for i in range(16)]
    # The fsdp ring is laid on the chip grid: each chip's ring neighbour is a physical
    # neighbour, the closing link included; the devices' own order jumps across the grid.
    assert hops(ring) == [1] * 16, hops(ring)
    assert max(hops(devs)) > 1
    assert sorted(d.id for d in ring) == sorted(d.id for d in devs)

    devs = _tpu_devices("v5e-8", 2)  # two slices of 8 chips
    assert sharding.num_slices(devs) == 2
    mesh = sharding.make_mesh(data=-1, fsdp=8, tensor=1, devices=devs)
    assert mesh.shape == {"data": 2, "fsdp": 8, "tensor": 1}
    # The data axis alone crosses the slice boundary: each data row is one whole slice.
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slice_of == np.arange(2)[:, None, None]).all(), slice_of
    with pytest.raises(ValueError, match="span 2 TPU slices.*data"):
        sharding.make_mesh(data=1, fsdp=16, tensor=1, devices=devs)
