"""Activation sharding: `sharding.activation_sharding` makes `layers.constrain` act.

Without the context the layers' logical constraints are no-ops (flax needs both the rules
and a mesh set with `jax.set_mesh`); inside it, a tiny UNet lowered on an 8-device
('data', 'fsdp', 'tensor') mesh carries a sharding constraint on its activations' batch
axis, and computes the same output. Runs in a fresh interpreter on 8 simulated devices.
"""

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
