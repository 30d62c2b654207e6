"""jaxmed.plan_flops: matrix-product and convolution FLOPs counted from a jaxpr, against the
arithmetic written out by hand, and the same per image whatever the mesh of the step."""

import importlib.util

import jax
import jax.numpy as jnp
import pytest

from jaxmed import plan, plan_flops, plan_topologies, sharding
from jaxmed.cli import load_config, set_override


def _count(f, *args) -> dict:
    return plan_flops.count(jax.make_jaxpr(f)(*args))


def test_products_and_convolutions_as_written_out():
    a, b = jnp.ones((3, 5, 7)), jnp.ones((3, 7, 11))
    product = _count(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b)
    assert product["flops"] == 2 * 3 * 5 * 7 * 11
    x, w = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 2, 4))  # 4 groups of 2 in-features

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=4,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    one = 2 * (2 * 16 * 16 * 4) * (3 * 3 * 2)  # per output element: the window x its group
    assert _count(conv, x, w)["flops"] == one
    # Its gradients: one convolution for x's and one for w's; the forward's result is then
    # needed by nothing and dropped, as XLA drops it, unless the value is returned too.
    loss = lambda x, w: conv(x, w).sum()
    assert _count(jax.grad(loss, (0, 1)), x, w)["flops"] == 2 * one
    assert _count(jax.value_and_grad(loss, (0, 1)), x, w)["flops"] == 3 * one


def test_loops_branches_and_remat():
    m = jnp.ones((4, 4))
    mm = 2 * 4 * 4 * 4

    def scanned(m):
        return jax.lax.scan(lambda c, _: (c @ m, None), m, None, length=5)[0]

    assert _count(scanned, m)["flops"] == 5 * mm
    branches = _count(lambda m, i: jax.lax.cond(i > 0, lambda: m @ m @ m, lambda: m), m, 1)
    assert branches["flops"] == 2 * mm  # the larger branch
    # Rematerialised: the backward recomputes the forward product.
    remat = _count(jax.value_and_grad(
        lambda m: jax.checkpoint(lambda m: jnp.sin(m @ m))(m).sum()), m)
    plain = _count(jax.value_and_grad(lambda m: jnp.sin(m @ m).sum()), m)
    assert plain["flops"] == 3 * mm and remat["flops"] == 4 * mm
    loop = _count(lambda m: jax.lax.while_loop(lambda c: c[0, 0] < 9, lambda c: c @ m, m), m)
    assert loop == {"flops": mm, "pallas_calls": 0, "while_loops": 1}


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed: no TPU topology to build meshes of")
def test_step_count_per_image_is_the_same_on_every_mesh():
    """The tiny UNet train step traced for one v5e chip and for v5e-8 with weights sharded
    (fsdp=8) or replicated (data=8): one count per image (XLA's own count differs)."""
    per_image = {}
    for topology, mesh in (("v5e-1", {}), ("v5e-8", {"mesh.data": "1", "mesh.fsdp": "8"}),
                           ("v5e-8", {"mesh.data": "8", "mesh.fsdp": "1"})):
        config = load_config("configs/finetune.py:unet")
        for k, v in {"model.path": "random:test@32", "data.resolution": "32",
                     "optim.grad_accum": "2", "train.per_device_batch": "1", **mesh}.items():
            set_override(config, k, v)
        topo = plan_topologies.get(topology)
        step = plan.make_step(config, topo, plan_topologies.devices(topo))
        with sharding.activation_sharding(step.mesh):
            counted = plan_flops.count(step.jitted.trace(*step.args).jaxpr)
        per_image[(topology, *mesh.values())] = counted["flops"] / step.images
    assert len(set(per_image.values())) == 1 and min(per_image.values()) > 0, per_image
