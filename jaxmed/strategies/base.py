"""What a fine-tuning strategy is: data over the parameter tree, not a fork of the loop.

The parameter tree jaxmed trains is ``{'unet': ..., 'vae': ..., 'text_encoder': ...}`` (plain
nested dicts of float32 arrays, any subset of the three). A strategy splits it into

* ``trainable``: the only tree that is differentiated and that has optimizer state
  (a sparse subtree of the params for masks; new adapter leaves for LoRA-like methods);
* ``frozen``: everything else (and any precomputed constants such as SVD factors),

and says how to get the parameters the models run with:

* ``combine(trainable, frozen)``: a pure function giving effective params (merge of the two
  trees, or weights rebuilt from adapters: W + dW, U diag(s + ds) V^T, ...);
* ``intercept(component, trainable, frozen, rng, train)``: a context manager that adds
  adapter branches to targeted layers while a component runs (LoRA / DoRA: only the layers'
  adapters get gradients, never the frozen kernels, and LoRA dropout acts as in peft);
* ``export(trainable, frozen)``: plain params with every adapter folded in.

Module names that strategies match are PyTorch's (``down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q``), so patterns read like peft's ``target_modules``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxmed.models import convert

COMPONENTS = ("unet", "vae", "text_encoder")
Params = dict[str, Any]


# ---------------------------------------------------------------------------------------
# Tree helpers


def flatten(tree: Mapping) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat)) if flat else {}


def merge_trees(a: Mapping, b: Mapping) -> dict:
    """Deep union of two nested dicts with disjoint leaves (b wins on a clash)."""
    flat = flatten(a)
    flat.update(flatten(b))
    return unflatten(flat)


def module_of(path: tuple[str, ...]) -> str:
    """PyTorch module name of a parameter path within one component (leaf dropped)."""
    return convert.module_name(path)


def leaf_kind(path: tuple[str, ...], value: Any) -> str:
    """'linear' / 'conv' / 'bias' / 'norm' / 'embedding' / 'other' for a parameter."""
    leaf = path[-1]
    if leaf == "kernel":
        return "conv" if len(value.shape) == 4 else "linear"
    if leaf == "scale":
        return "norm"
    if leaf == "embedding":
        return "embedding"
    if leaf == "bias":
        return "bias"
    return "other"


def count(tree: Any) -> int:
    return int(sum(int(x.size) for x in jax.tree_util.tree_leaves(tree)))


def nbytes(tree: Any) -> int:
    return int(sum(int(x.size) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


def match_targets(patterns: str | Iterable[str], name: str) -> bool:
    """peft's target_modules semantics: a str is a full regex; a list entry matches the
    module name exactly or as its dotted suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


class StrategyError(ValueError):
    """A strategy cannot be built as configured (unknown name, pattern matching nothing)."""


# ---------------------------------------------------------------------------------------
# The strategy object


@dataclasses.dataclass(frozen=True)
class Strategy:
    """Base class; subclasses override what differs. Instances are immutable and hashable
    so they can be closed over by jitted functions."""

    name: str
    description: str = ""
    trains: tuple[str, ...] = ("unet",)  # components that receive gradients
    lrs: tuple[tuple[str, float], ...] = (("unet", 1e-5),)
    per_device_batch: int = 4

    # -- splitting and combining
    def init(self, params: Params, rng: jax.Array) -> tuple[Params, Params]:
        raise NotImplementedError

    def combine(self, trainable: Params, frozen: Params) -> Params:
        return merge_trees(frozen, trainable)

    @contextlib.contextmanager
    def intercept(
        self, component: str, trainable: Params, frozen: Params, *, rng=None, train=False
    ) -> Iterator[None]:
        yield

    def export(self, trainable: Params, frozen: Params) -> Params:
        """Plain params (every adapter folded in) for a diffusers-layout export."""
        params = self.combine(trainable, frozen)
        return {c: params[c] for c in COMPONENTS if c in params}

    # -- optimisation metadata
    def lr_labels(self, trainable: Params) -> Params:
        """Tree like ``trainable`` holding each leaf's component name (its lr group)."""
        return {c: jax.tree_util.tree_map(lambda _, c=c: c, sub) for c, sub in trainable.items()}

    def adapter_mask(self, trainable: Params) -> Params:
        """True on leaves that are adapters (new parameters, not model weights): the
        authors' code left these out of gradient clipping."""
        return jax.tree_util.tree_map(lambda _: False, trainable)

    def learning_rates(self) -> dict[str, float]:
        return dict(self.lrs)

    def abstract(self, abstract_params: Params) -> tuple[Params, Params]:
        """(trainable, frozen) as ShapeDtypeStructs, without memory."""
        return jax.eval_shape(lambda p: self.init(p, jax.random.PRNGKey(0)), abstract_params)

    def require_components(self, params: Params, components: Iterable[str] | None = None):
        """StrategyError unless every component this strategy trains is in ``params``."""
        missing = [c for c in (self.trains if components is None else components)
                   if c not in params]
        if missing:
            raise StrategyError(
                f"strategy {self.name!r} trains {list(self.trains)} but the parameter tree "
                f"has no {missing} (it holds {sorted(params)})"
            )


def module_names(params: Mapping, kinds: Iterable[str] | None = None) -> list[str]:
    """Sorted PyTorch module names of one component's parameter tree (optionally only the
    modules holding a leaf of the given `leaf_kind`s): what target patterns are matched
    against, for error messages."""
    kinds = set(kinds) if kinds is not None else None
    return sorted({module_of(p) for p, v in flatten(params).items()
                   if kinds is None or leaf_kind(p, v) in kinds})


def describe_names(names: list[str], n: int = 4) -> str:
    if len(names) <= 2 * n:
        return str(names)
    return f"{names[:n]} ... {names[-n:]}"


def split_by(params: Params, select: Callable[[str, tuple[str, ...], Any], bool]):
    """(selected, rest) by a predicate on (component, path, leaf)."""
    sel, rest = {}, {}
    for comp, sub in params.items():
        for path, v in flatten(sub).items():
            (sel if select(comp, path, v) else rest)[(comp, *path)] = v
    return unflatten(sel), unflatten(rest)


@dataclasses.dataclass(frozen=True)
class MaskStrategy(Strategy):
    """Fine-tune the leaves a predicate selects; everything else is frozen as is."""

    select: Callable[[str, tuple[str, ...], Any], bool] = lambda c, p, v: False
    pattern: Any = None  # the target pattern behind `select`, if any (for error messages)

    def init(self, params: Params, rng: jax.Array) -> tuple[Params, Params]:
        self.require_components(params)
        trainable, frozen = split_by(params, self.select)
        empty = [c for c in self.trains if not jax.tree_util.tree_leaves(trainable.get(c, {}))]
        if empty:
            c = empty[0]
            names = module_names(params[c])
            if self.pattern is None:
                raise StrategyError(
                    f"strategy {self.name!r} selects no parameter of the {c} (its "
                    f"{len(names)} modules are such as {describe_names(names)})")
            raise StrategyError(
                f"strategy {self.name!r}: its pattern {self.pattern!r} selects no parameter of "
                f"the {c}. Patterns are matched as peft's target_modules (a list entry: the "
                "exact module name or a dotted suffix of it; a string: a full regex) against "
                f"its {len(names)} module names, such as {describe_names(names)}"
            )
        return trainable, frozen
