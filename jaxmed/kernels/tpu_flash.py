"""Attention on TPU by the Pallas flash kernel (`jax.experimental.pallas.ops.tpu.
flash_attention`): softmax(q k^T) v tile by tile in VMEM, never the (B, heads, Lq, Lk)
logits in HBM, with the kernel's own backward (a custom_vjp of Pallas kernels).

What the kernel needs and how SD's shapes are brought to it:
* head dims of at most 128 or a multiple of 128: SD's 160 is zero-padded to 256 (zeros
  change no dot product; the padded output columns are sliced off). 40 and 80 go as they
  are.
* sequence lengths that its blocks (multiples of 128) divide: queries and keys are
  zero-padded to a multiple of 128. Padded keys are masked out by segment ids (real keys
  segment 1, padding 0; every query segment 1), so a query never attends to them; padded
  queries are sliced off.
* the batch split over the mesh by hand: a Pallas call is opaque to XLA's partitioner,
  which would gather its operands onto every chip, so under a mesh (`jax.set_mesh`, what
  `jaxmed.sharding.activation_sharding` enters) the kernel runs in a `jax.shard_map` over
  the mesh axes that shard the batch.

TPU v2 and v3 have no Pallas (Mosaic) support: there `supported()` is False and
`kernels.dispatch` keeps the einsum reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

try:  # part of jax, but guarded: a jax build without Mosaic must still import jaxmed
    from jax.experimental.pallas.ops.tpu import flash_attention as _flash
except ImportError:  # pragma: no cover - depends on the jax build
    _flash = None

LANES = 128  # the kernel's minimum block along sequences (and head dims above 128)
MAX_BLOCK = 512  # the largest query/key tile tried (dividing the padded length)
BATCH_AXES = ("data", "fsdp")  # jaxmed.sharding.BATCH_AXES (that module imports models)
NO_PALLAS = ("TPU v2", "TPU v3")  # device kinds without Mosaic


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _device_kinds() -> list[str]:
    """Kinds of the devices being compiled for, where known: the context mesh's (set by
    `jax.set_mesh`), else this host's devices when they are TPUs; empty when neither says
    (a CPU host compiling for a TPU topology without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    if device is not None:
        return [str(device.device_kind)]
    if jax.default_backend() == "tpu":
        return [d.device_kind for d in jax.devices()]
    return []


def supported() -> bool:
    """Whether the Pallas kernel can run: the import worked and no device compiled for is a
    TPU v2/v3."""
    if _flash is None:
        return False
    return not any(k.startswith(NO_PALLAS) for k in _device_kinds())


def _block(length: int) -> int:
    """The largest of 512, 256, 128 dividing ``length`` (a multiple of 128)."""
    for b in (MAX_BLOCK, 256, LANES):
        if b <= length and length % b == 0:
            return b
    return LANES


def _padded_head_dim(d: int) -> int:
    return d if d <= LANES else _round_up(d, LANES)


def flash_heads(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """The kernel on (B, heads, L, d) tensors, any L and d: pads, masks padded keys, slices
    back. Returns (B, heads, Lq, d) in q's dtype."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    dp, lqp, lkp = _padded_head_dim(d), _round_up(lq, LANES), _round_up(lk, LANES)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, lqp - lq), (0, dp - d)))
    k = jnp.pad(k, ((0, 0), (0, 0), (0, lkp - lk), (0, dp - d)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, lkp - lk), (0, dp - d)))
    segment_ids = None
    if lkp != lk:
        kv_ids = jnp.broadcast_to((jnp.arange(lkp) < lk).astype(jnp.int32), (b, lkp))
        segment_ids = _flash.SegmentIds(q=jnp.ones((b, lqp), jnp.int32), kv=kv_ids)
    bq, bk = _block(lqp), _block(lkp)
    sizes = _flash.BlockSizes(
        block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
        block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
        block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
    out = _flash.flash_attention(q, k, v, segment_ids=segment_ids, sm_scale=scale,
                                 block_sizes=sizes)
    return out[:, :, :lq, :d]


def _batch_spec(batch: int) -> PartitionSpec | None:
    """PartitionSpec sharding dim 0 over the context mesh's batch axes (those present and
    dividing ``batch``), or None outside a mesh / where nothing shards."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    axes, size = [], 1
    for name in BATCH_AXES:
        n = mesh.shape.get(name, 1)
        if n > 1 and batch % (size * n) == 0:
            axes.append(name)
            size *= n
    return PartitionSpec(tuple(axes)) if axes else None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, *,
              upcast: bool = True) -> jax.Array:
    """Multi-head attention on (B, L, C) tensors, as `kernels.reference.attention` (no
    mask). The kernel's logits and softmax are float32 whatever the input dtype (its dots
    accumulate in float32), which is what ``upcast`` asks; so ``upcast`` changes nothing."""
    del upcast
    b, lq, c = q.shape
    lk = k.shape[1]
    d = c // heads
    scale = d**-0.5

    def run(q, k, v):
        n = q.shape[0]
        qh = q.reshape(n, lq, heads, d).transpose(0, 2, 1, 3)
        kh = k.reshape(n, lk, heads, d).transpose(0, 2, 1, 3)
        vh = v.reshape(n, lk, heads, d).transpose(0, 2, 1, 3)
        out = flash_heads(qh, kh, vh, scale)
        return out.transpose(0, 2, 1, 3).reshape(n, lq, c)

    spec = _batch_spec(b)
    if spec is None:
        return run(q, k, v)
    return jax.shard_map(run, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)
