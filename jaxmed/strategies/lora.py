"""LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024), exactly as peft computes them.

For a targeted Linear ``y = x W + b`` (W stored (in, out)) with rank r and scaling s = alpha/r:

* LoRA: ``y + s * (dropout(x) A) B`` with A (in, r) kaiming-uniform and B (r, out) zero.
* DoRA: a magnitude m (out,) initialised to the column norms of W, and
  ``y + (m/n - 1) * x' W + (m/n) * s * (x' A) B`` with ``x' = dropout(x)`` and
  ``n = ||W + s A B||`` per output unit, held constant in the backward pass (peft's
  ``weight_norm.detach()``, DoRA section 4.3). With dropout 0 this is x (m/n)(W + sAB) + b.

The branches are added unmerged by intercepting the targeted Linear modules while a component
runs, so the frozen W gets no weight gradient and LoRA dropout behaves as in peft.
`export` folds them into plain weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.models.layers import Linear, torch_default_init
from jaxmed.strategies.base import (
    Params,
    Strategy,
    StrategyError,
    flatten,
    match_targets,
    module_of,
    unflatten,
)

STUDY_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
_ADAPTER_LEAVES = ("lora_A", "lora_B", "lora_magnitude_vector")


@dataclasses.dataclass(frozen=True)
class LoraStrategy(Strategy):
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str = STUDY_TARGETS
    text_targets: tuple[str, ...] | str = ()
    use_dora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def _component_targets(self) -> dict[str, tuple[str, ...] | str]:
        out = {}
        if self.targets:
            out["unet"] = self.targets
        if self.text_targets:
            out["text_encoder"] = self.text_targets
        return out

    def target_modules(self, params: Params) -> dict[str, list[tuple[str, ...]]]:
        """Module paths (per component) that get an adapter; errors if a pattern matches
        nothing or matches a layer that is not a Linear."""
        found = {}
        for comp, patterns in self._component_targets().items():
            if comp not in params:
                raise StrategyError(
                    f"{self.name}: targets on {comp!r} but the parameter tree has only "
                    f"{sorted(params)}"
                )
            kernels = {p[:-1]: v for p, v in flatten(params[comp]).items() if p[-1] == "kernel"}
            hits = sorted(m for m in kernels if match_targets(patterns, module_of(m + ("kernel",))))
            if not hits:
                names = sorted(module_of(m + ("kernel",)) for m in kernels)
                raise StrategyError(
                    f"{self.name}: target pattern {patterns!r} matches no layer of the {comp}. "
                    f"It is matched (as peft does: exact name or dotted suffix for a list, full "
                    f"regex for a string) against {len(names)} module names such as "
                    f"{names[:3] + names[-3:]}"
                )
            convs = [module_of(m + ("kernel",)) for m in hits if len(kernels[m].shape) != 2]
            if convs:
                raise StrategyError(
                    f"{self.name}: target pattern {patterns!r} matches convolution layers "
                    f"{convs[:3]}; jaxmed's LoRA/DoRA adapt Linear layers only"
                )
            found[comp] = hits
        return found

    def init(self, params: Params, rng: jax.Array) -> tuple[Params, Params]:
        trainable = {}
        for comp, modules in self.target_modules(params).items():
            flat = {}
            for i, m in enumerate(modules):
                kernel = _get(params[comp], m)["kernel"]
                d_in, d_out = kernel.shape
                a = torch_default_init(jax.random.fold_in(rng, i), (d_in, self.rank), jnp.float32)
                flat[m + ("lora_A", "kernel")] = a
                flat[m + ("lora_B", "kernel")] = jnp.zeros((self.rank, d_out), jnp.float32)
                if self.use_dora:
                    flat[m + ("lora_magnitude_vector",)] = jnp.linalg.norm(kernel, axis=0)
            trainable[comp] = unflatten(flat)
        return trainable, params

    def combine(self, trainable: Params, frozen: Params) -> Params:
        return frozen  # branches are added by `intercept`

    def adapter_mask(self, trainable: Params) -> Params:
        return jax.tree_util.tree_map(lambda _: True, trainable)

    @contextlib.contextmanager
    def intercept(
        self, component: str, trainable: Params, frozen: Params, *, rng=None, train=False
    ) -> Iterator[None]:
        table = _adapter_table(trainable.get(component, {}))
        if not table:
            yield
            return
        index = {m: i for i, m in enumerate(sorted(table))}
        use_dropout = train and self.dropout > 0.0
        if use_dropout and rng is None:
            raise ValueError(f"{self.name}: LoRA dropout in training needs an rng")

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name != "__call__" or not isinstance(mod, Linear):
                return next_fun(*args, **kwargs)
            entry = table.get(tuple(mod.path))
            if entry is None:
                return next_fun(*args, **kwargs)
            x = args[0]
            y = next_fun(*args, **kwargs)
            dt = y.dtype
            xd = x
            if use_dropout:
                keep = jax.random.bernoulli(
                    jax.random.fold_in(rng, index[tuple(mod.path)]), 1.0 - self.dropout, x.shape
                )
                xd = jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(x.dtype)
            a = entry["lora_A"]["kernel"].astype(dt)
            b = entry["lora_B"]["kernel"].astype(dt)
            lora = jnp.dot(jnp.dot(xd.astype(dt), a), b) * self.scaling
            if "lora_magnitude_vector" not in entry:
                return y + lora
            base = _get(frozen[component], tuple(mod.path))
            w = base["kernel"]
            norm = jax.lax.stop_gradient(_column_norm(w, entry, self.scaling))
            mag = (entry["lora_magnitude_vector"] / norm).astype(dt)
            if use_dropout:
                base_out = jnp.dot(xd.astype(dt), w.astype(dt))
            else:
                base_out = y - base["bias"].astype(dt) if "bias" in base else y
            return y + (mag - 1.0) * base_out + mag * lora

        with nn.intercept_methods(interceptor):
            yield

    def export(self, trainable: Params, frozen: Params) -> Params:
        out = {c: v for c, v in frozen.items()}
        for comp, sub in trainable.items():
            flat = flatten(frozen[comp])
            for m, entry in _adapter_table(sub).items():
                w = flat[m + ("kernel",)]
                merged = w + self.scaling * entry["lora_A"]["kernel"] @ entry["lora_B"]["kernel"]
                if "lora_magnitude_vector" in entry:
                    merged = merged * (entry["lora_magnitude_vector"] / _column_norm(
                        w, entry, self.scaling))
                flat[m + ("kernel",)] = merged
            out[comp] = unflatten(flat)
        return out


def _column_norm(w: jax.Array, entry: dict, scaling: float) -> jax.Array:
    """||W + s A B|| per output unit (axis 0 of the (in, out) kernel), as peft's weight norm."""
    delta = entry["lora_A"]["kernel"] @ entry["lora_B"]["kernel"]
    return jnp.linalg.norm(w + scaling * delta, axis=0)


def _get(tree: dict, path: tuple[str, ...]) -> dict:
    for p in path:
        tree = tree[p]
    return tree


def _adapter_table(sub: Params) -> dict[tuple[str, ...], dict]:
    """{module path: {'lora_A': .., 'lora_B': .., ['lora_magnitude_vector': ..]}}."""
    table: dict[tuple[str, ...], dict] = {}
    for path, v in flatten(sub).items():
        for i, p in enumerate(path):
            if p in _ADAPTER_LEAVES:
                entry = table.setdefault(path[:i], {})
                if p == "lora_magnitude_vector":
                    entry[p] = v
                else:
                    entry.setdefault(p, {})[path[-1]] = v
                break
    return table


def lora(rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets=STUDY_TARGETS,
         text_targets=(), lr: float = 1e-4, text_lr: float | None = None) -> LoraStrategy:
    return _make("lora", rank, alpha, dropout, targets, text_targets, lr, text_lr, False, 4)


def dora(rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets=STUDY_TARGETS,
         text_targets=(), lr: float = 1e-4, text_lr: float | None = None) -> LoraStrategy:
    return _make("dora", rank, alpha, dropout, targets, text_targets, lr, text_lr, True, 8)


def _make(name, rank, alpha, dropout, targets, text_targets, lr, text_lr, use_dora, batch):
    if rank < 1:
        raise StrategyError(f"{name}: rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise StrategyError(f"{name}: dropout must be in [0, 1), got {dropout}")
    targets = targets if isinstance(targets, str) else tuple(targets)
    text_targets = text_targets if isinstance(text_targets, str) else tuple(text_targets)
    lrs = [("unet", lr)] if targets else []
    if text_targets:
        lrs.append(("text_encoder", text_lr if text_lr is not None else lr))
    trains = tuple(c for c, _ in lrs)
    what = "DoRA" if use_dora else "LoRA"
    return LoraStrategy(
        name=name,
        description=f"{what} r={rank} alpha={alpha} dropout={dropout} on {targets}"
        + (f" + text {text_targets}" if text_targets else ""),
        trains=trains, lrs=tuple(lrs), per_device_batch=batch, rank=rank, alpha=alpha,
        dropout=dropout, targets=targets, text_targets=text_targets, use_dora=use_dora,
    )
