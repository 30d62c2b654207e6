"""FLOPs of a traced step counted from its jaxpr, before any compiler or partitioner sees it:
2 x the multiply-adds of every matrix product (``dot_general``) and convolution, through
every nested jaxpr (jit, remat, custom derivatives), a loop's body times its trip count and
the larger branch of a ``cond``.

Why `jaxmed.plan` counts them itself: XLA's cost analysis of a program compiled for a TPU
slice misses work. On slices that shard the weights (fsdp) its count falls with the shard
count (SD 1.5 `lora` at 4 images per chip: 2.16e12 FLOPs per image on one chip or with
data=8, 1.33e12 with fsdp=8; README, "FLOPs"), and Pallas kernels without a cost
estimate (the flash attention's backward) count nothing. The jaxpr holds every platform's
attention (`jax.lax.platform_dependent` is a ``cond``): the larger branch is the einsum's
arithmetic, what the flash kernel computes too. So this count depends neither on the mesh
nor on kernels or compile effort. Elementwise work (norms, activations, the optimizer
update) is left out, as model-FLOPs (MFU) counts leave it out. Equations whose results no
output needs are dropped, as XLA drops them; inside a nested jaxpr, all of its outputs
count as needed.
"""

from __future__ import annotations

import math

from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, jaxprs_in_params


def _size(shape) -> int:
    return math.prod(int(d) for d in shape)


def _dot(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    (_, rc), (_, rb) = eqn.params["dimension_numbers"]
    # every lhs element meets every rhs element outside the contracted and batch dims
    rhs_free = _size(d for i, d in enumerate(rhs) if i not in set(rc) | set(rb))
    return 2.0 * _size(lhs) * rhs_free


def _conv(eqn) -> float:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    out_feature = eqn.params["dimension_numbers"].rhs_spec[0]
    # each output element is a dot over the kernel window and its input features (the
    # kernel's in-feature size is already per group)
    return 2.0 * _size(out) * _size(rhs) / int(rhs[out_feature])


def _shards(eqn) -> int:
    """How many copies of a shard_map body run: the sizes of its manual mesh axes."""
    mesh = eqn.params.get("mesh")
    axes = eqn.params.get("manual_axes") or getattr(mesh, "axis_names", ())
    shape = dict(getattr(mesh, "shape", {}) or {})
    return math.prod(int(shape.get(a, 1)) for a in axes)


def count(jaxpr: Jaxpr | ClosedJaxpr) -> dict:
    """``{"flops": total, "pallas_calls": opaque kernels met (counted as 0),
    "while_loops": loops of unknown trip count (body counted once)}``."""
    out = {"flops": 0.0, "pallas_calls": 0, "while_loops": 0}
    _walk(jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr, 1.0, out)
    return out


def _live(jaxpr: Jaxpr) -> list:
    """The equations that feed the jaxpr's outputs (or have effects): XLA drops the rest,
    e.g. gradients of frozen weights that a step computes but never returns."""
    live = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in live for v in eqn.outvars):
            kept.append(eqn)
            live.update(v for v in eqn.invars if not isinstance(v, Literal))
    return kept[::-1]


def _walk(jaxpr: Jaxpr, times: float, out: dict) -> None:
    for eqn in _live(jaxpr):
        name = eqn.primitive.name
        if name == "dot_general":
            out["flops"] += times * _dot(eqn)
        elif name == "conv_general_dilated":
            out["flops"] += times * _conv(eqn)
        elif name == "pallas_call":
            out["pallas_calls"] += 1
        elif name == "scan":
            _walk(eqn.params["jaxpr"].jaxpr, times * int(eqn.params["length"]), out)
        elif name == "while":
            out["while_loops"] += 1
            _walk(eqn.params["body_jaxpr"].jaxpr, times, out)
        elif name == "cond":
            branches = []
            for b in eqn.params["branches"]:
                branch = {"flops": 0.0, "pallas_calls": 0, "while_loops": 0}
                _walk(b.jaxpr, times, branch)
                branches.append(branch)
            best = max(branches, key=lambda b: b["flops"])
            for k in out:
                out[k] += best[k]
        else:
            n = _shards(eqn) if name == "shard_map" else 1
            for sub in jaxprs_in_params(eqn.params):
                _walk(sub, times * n, out)
