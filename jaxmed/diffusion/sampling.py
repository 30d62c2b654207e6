"""The guided sampling function: seeded noise, classifier-free guidance, and the whole
denoising loop inside one jitted function.

`make_sample_fn` builds ``fn(params, cond_ids, uncond_ids, image_ids, latents=None) ->
images`` for a model, sampler, number of steps, guidance scale and size. Every image's
starting noise comes from ``fold_in(PRNGKey(seed), image_id)`` (`initial_noise`) unless
given as ``latents`` (as diffusers pipelines' ``latents=``), and the per-step noise of the
stochastic samplers from ``fold_in(fold_in(fold_in(PRNGKey(seed), image_id), 1), step)``,
so an image is a function of the seed, its id and its latents only, whichever batch,
padding or number of devices computes it. Bit for bit too with ``micro_batch`` set
(synthesis defaults to 1): each device then runs the same program on m images at a time,
whatever the device count, whereas CPU GEMM blocking depends on the batch size and moves
results by ~1e-6.

Classifier-free guidance runs the unconditional and conditional branches as one batch of
2B, as diffusers does, except at guidance 1, where ``u + 1 * (c - u)`` is the conditional
prediction and the unconditional branch is skipped.
With a ``mesh`` the batch axis is sharded over the mesh's ('data', 'fsdp') axes and the
parameters are replicated (or placed as given); batches are padded to a multiple of the
number of batch shards and the padding images are dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed import sharding
from jaxmed.diffusion import samplers
from jaxmed.models.sd import StableDiffusion

# ---------------------------------------------------------------------------------------
# Noise and guidance


def initial_noise(seed: int, image_ids: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """(B, *shape) standard normal noise, one independent stream per global image id."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape))(image_ids)


def step_noise(seed: int, image_ids: jax.Array, step: jax.Array, shape: tuple[int, ...]
               ) -> jax.Array:
    """(B, *shape) noise of sampling step ``step`` (DDPM, DDIM eta > 0), per image id."""
    base = jax.random.PRNGKey(seed)

    def one(i):
        k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, i), 1), step)
        return jax.random.normal(k, shape)

    return jax.vmap(one)(image_ids)


def guided_model_fn(sd: StableDiffusion, unet_params: Any, context: jax.Array,
                    uncond_context: jax.Array, guidance_scale: float, *,
                    skip_uncond_at_one: bool = True):
    """``model_fn(x, t)`` with classifier-free guidance ``u + g * (c - u)`` (diffusers' rule).

    Both branches run as one UNet batch of 2B. The two are interleaved per image (rows
    u_0, c_0, u_1, c_1, ...) rather than concatenated, so that a batch sharded over devices
    stays on its devices (no all-to-all); every row is computed independently, so the order
    does not change the result. At ``guidance_scale == 1`` the unconditional branch is
    skipped unless ``skip_uncond_at_one=False``.
    """
    g = float(guidance_scale)
    if g == 1.0 and skip_uncond_at_one:
        return lambda x, t: sd.predict(unet_params, x, t, context)
    ctx2 = jnp.stack([uncond_context, context], axis=1).reshape(
        (-1,) + context.shape[1:])

    def model_fn(x, t):
        x2 = jnp.stack([x, x], axis=1).reshape((-1,) + x.shape[1:])
        out = sd.predict(unet_params, x2, t, ctx2).reshape((x.shape[0], 2) + x.shape[1:])
        u, c = out[:, 0], out[:, 1]
        return u + g * (c - u)

    return model_fn


# ---------------------------------------------------------------------------------------
# The jitted sampling function


def check_size(sd: StableDiffusion, height: int, width: int) -> None:
    f = sd.vae_scale
    m = f * 2 ** (len(sd.unet.config.block_out_channels) - 1)
    if height % m or width % m or height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} must be a positive multiple of {m} "
                         f"(VAE factor {f} x 2^(UNet levels - 1)) for this model")


def make_sample_fn(
    sd: StableDiffusion,
    *,
    sampler: str = "pndm",
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    seed: int = 42,
    eta: float = 0.0,
    mesh: jax.sharding.Mesh | None = None,
    params_sharding: Any = None,
    micro_batch: int | None = None,
    skip_uncond_at_one: bool = True,
):
    """A jitted ``fn(params, cond_ids, uncond_ids, image_ids, latents=None) -> (B, H, W, 3)
    float32 [0, 1]``.

    ``params`` are plain (adapter-free) params {'unet', 'vae', 'text_encoder'}: fold any
    adapter in first with `Strategy.export`. ``cond_ids`` / ``uncond_ids`` are (B, 77) token
    ids, ``image_ids`` (B,) int32 global image ids (they seed the noise). ``latents``, if
    given, are the starting noise instead of ``initial_noise(seed, image_ids, ...)``:
    (B, H/f, W/f, C) channels-last for VAE factor f (``fn.latent_shape`` per image), times the
    sampler's init_noise_sigma as diffusers' pipelines do with theirs (a diffusers
    ``latents`` tensor (B, C, h, w) becomes ``latents.permute(0, 2, 3, 1)``).

    With ``mesh``: inputs and output are sharded on the batch axis over ('data', 'fsdp'),
    params replicated (or placed by ``params_sharding``, a sharding or a tree of them); the
    batch is padded to a multiple of the batch shards and the padding dropped. Without a
    mesh it is plain ``jax.jit`` on the default device.

    ``micro_batch``: None runs each device's whole shard as one batch (fastest). On CPU
    the result of a convolution / matmul row can change in the last bits with the batch
    size (the GEMM blocking depends on it), so images then agree across device counts
    only to ~1e-6. With ``micro_batch=m`` each device runs its shard m images at a time
    (``lax.map``), so the per-device program is the same whatever the device count and
    the images are bitwise identical for a given m; batches are padded to a multiple of
    m x the batch shards. ``fn.jitted`` is the jitted function (for ``.lower().compile()``;
    its arguments are ``fn``'s, ``latents`` always given), ``fn.replicas`` the number of
    batch shards.
    """
    if sampler not in samplers.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} "
                         f"(choose from {', '.join(samplers.SAMPLERS)})")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1 or None, got {micro_batch}")
    res = sd.vae.config.sample_size
    height = int(height or res)
    width = int(width or height)
    check_size(sd, height, width)
    f = sd.vae_scale
    opts = {"eta": eta} if sampler == "ddim" else {}
    smp = samplers.make_sampler(sampler, sd.scheduler_config, num_steps, **opts)
    stochastic = sampler == "ddpm" or (sampler == "ddim" and eta > 0)
    lat_shape = (height // f, width // f, sd.unet.config.in_channels)
    batch_sh = None
    if mesh is not None:
        batch_sh = {n: sharding.batch_sharding(mesh, n) for n in (1, 2, 4)}

    def constrain(x):
        if batch_sh is None:
            return x
        return jax.lax.with_sharding_constraint(x, batch_sh[x.ndim])

    def run(params, cond_ids, uncond_ids, image_ids, latents):
        ctx = sd.encode_text(params["text_encoder"], cond_ids)
        uctx = None
        if not (guidance_scale == 1.0 and skip_uncond_at_one):
            uctx = sd.encode_text(params["text_encoder"], uncond_ids)
        model_fn = guided_model_fn(sd, params["unet"], ctx, uctx, guidance_scale,
                                   skip_uncond_at_one=skip_uncond_at_one)
        x = constrain(latents.astype(jnp.float32) * smp.init_noise_sigma)
        state = smp.init_state(x, jax.random.PRNGKey(seed) if stochastic else None)

        def body(carry, i):
            x, st = carry
            out = model_fn(smp.scale_model_input(x, i), smp.timesteps[i])
            kw = {"noise": step_noise(seed, image_ids, i, lat_shape)} if stochastic else {}
            x, st, _ = smp.step(st, out, i, x, **kw)
            return (constrain(x), st), None

        (latents, _), _ = jax.lax.scan(body, (x, state), jnp.arange(smp.num_inference_steps))
        images = sd.decode_latents(params["vae"], latents)
        return jnp.clip((images + 1.0) / 2.0, 0.0, 1.0)

    replicas = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    chunk = replicas * (micro_batch or 1)

    def fn(params, cond_ids, uncond_ids, image_ids, latents):
        if micro_batch is None:
            return run(params, cond_ids, uncond_ids, image_ids, latents)
        # Each device runs its shard micro_batch images at a time (lax.map), so the
        # per-device program, and hence every image bit, is the same for any device count.
        b, m = image_ids.shape[0], micro_batch
        k = b // chunk

        def split(a):  # (B, ...) -> (k, R, m, ...): device r keeps its rows
            return jnp.swapaxes(a.reshape((replicas, k, m) + a.shape[1:]), 0, 1)

        def one(args):
            c, u, i, lat = (constrain(a.reshape((replicas * m,) + a.shape[2:])) for a in args)
            out = run(params, c, u, i, lat)
            return out.reshape((replicas, m) + out.shape[1:])

        out = jax.lax.map(one, tuple(split(a) for a in (cond_ids, uncond_ids, image_ids,
                                                        latents)))
        return constrain(jnp.swapaxes(out, 0, 1).reshape((b,) + out.shape[3:]))

    # One sampling program whether the latents are seeded or given: the seeded ones come
    # from a small program of their own.
    if mesh is None:
        jitted = jax.jit(fn)
        noise = jax.jit(lambda ids: initial_noise(seed, ids, lat_shape))
        p_sh = None
    else:
        p_sh = params_sharding if params_sharding is not None else sharding.replicated(mesh)
        jitted = jax.jit(fn, in_shardings=(p_sh, batch_sh[2], batch_sh[2], batch_sh[1],
                                           batch_sh[4]),
                         out_shardings=batch_sh[4])
        noise = jax.jit(lambda ids: initial_noise(seed, ids, lat_shape),
                        in_shardings=batch_sh[1], out_shardings=batch_sh[4])

    def call(params, cond_ids, uncond_ids, image_ids, latents=None):
        xp = jnp if mesh is None else np  # host arrays are placed shard by shard below
        args = [xp.asarray(cond_ids), xp.asarray(uncond_ids), xp.asarray(image_ids, np.int32)]
        n = args[2].shape[0]
        if latents is not None:
            latents = xp.asarray(latents, np.float32)
            if latents.shape != (n, *lat_shape):
                raise ValueError(
                    f"latents of shape {tuple(latents.shape)}: expected {(n, *lat_shape)} "
                    f"(batch, height/{f}, width/{f}, channels: channels last) for "
                    f"{n} images of {height}x{width}")
            args.append(latents)
        pad = -n % chunk
        if pad:  # repeat the last image; the padding is computed and dropped
            args = [xp.concatenate([a, xp.repeat(a[-1:], pad, axis=0)]) for a in args]
        if mesh is not None:
            params = place_params(params, p_sh)
            args = [sharding.put(a, batch_sh[a.ndim]) for a in args]
        if latents is None:
            args.append(noise(args[2]))
        if mesh is not None:
            with sharding.activation_sharding(mesh):
                out = jitted(params, *args)
        else:
            out = jitted(params, *args)
        return out[:n] if pad else out

    call.jitted, call.replicas, call.micro_batch, call.mesh = jitted, replicas, micro_batch, mesh
    call.height, call.width, call.latent_shape = height, width, lat_shape
    return call


def place_params(params: Any, shardings: Any) -> Any:
    """``params`` laid out by ``shardings`` (one sharding or a matching tree): host arrays
    are placed shard by shard (`sharding.put`: each process supplies its own shards), jax
    Arrays resharded; leaves already laid out so are kept as they are."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree_util.tree_map(lambda _: shardings, params)

    def one(x, sh):
        if isinstance(x, jax.Array):
            return x if x.sharding == sh else jax.device_put(x, sh)
        return sharding.put(x, sh)
    return jax.tree_util.tree_map(one, params, shardings)


@functools.lru_cache(maxsize=8)
def empty_ids(sd: StableDiffusion, n: int, text: str = "") -> np.ndarray:
    """(n, 77) token ids of ``text`` (the unconditional or negative prompt), cached."""
    return np.repeat(np.asarray(sd.tokenize([text])), n, axis=0)


def generate(
    sd: StableDiffusion,
    params: dict,
    prompts: Sequence[str],
    *,
    first_id: int = 0,
    fn=None,
    negative_prompt: str = "",
    latents=None,
    **kwargs,
) -> np.ndarray:
    """Images (N, H, W, 3) uint8 for ``prompts``; ids first_id.. seed their noise, or
    ``latents`` (N, h, w, C) are their starting noise (see `make_sample_fn`)."""
    fn = fn or make_sample_fn(sd, **kwargs)
    cond = np.asarray(sd.tokenize(list(prompts)))
    uncond = empty_ids(sd, len(prompts), negative_prompt)
    ids = np.arange(first_id, first_id + len(prompts), dtype=np.int32)
    if getattr(fn, "mesh", None) is None:
        ids = jnp.asarray(ids)
    images = fn(params, cond, uncond, ids, latents)
    return to_uint8(images)


def to_uint8(images) -> np.ndarray:
    """[0, 1] images -> uint8 on the host. Images spread over several processes (sampled
    over a mesh spanning them) are gathered first: every process must call it then."""
    if isinstance(images, jax.Array) and not images.is_fully_addressable:
        images = sharding.to_host(images)
    return np.asarray(np.round(np.asarray(images, np.float32) * 255.0), np.uint8)


# How synthesis stores an image: "grey" (single channel, as radiographs are stored) or
# "rgb" (the 3 channels SD's VAE decodes). docs/STUDY.md "Where jaxmed departs from the study".
COLORS = ("grey", "rgb")


def check_color(color: str) -> str:
    if color not in COLORS:
        raise ValueError(f"synthesis colour {color!r}: choose 'grey' (single channel, as "
                         "radiographs are stored) or 'rgb'")
    return color


def to_stored(images, color: str = "rgb") -> np.ndarray:
    """Decoded images in [0, 1] (N, H, W, 3) -> the uint8 pixels synthesis writes.

    ``"rgb"``: (N, H, W, 3). ``"grey"``: (N, H, W) ITU-R 601 luma in PIL's fixed-point
    arithmetic (``Image.convert("L")``, bit for bit), so a grey input (R = G = B) is
    returned unchanged and the PNG is what PIL would have written.
    """
    x = to_uint8(images)
    if check_color(color) == "rgb":
        return x
    r, g, b = (x[..., k].astype(np.uint32) for k in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)
