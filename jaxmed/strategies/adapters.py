"""What the adapter strategies (LoRA, DoRA) share: `AdapterStrategy`, new weights on the
Linear layers that target patterns name, added as an unmerged branch while a component runs.

The branch is added by intercepting the targeted `jaxmed.models.layers.Linear` calls
(``nn.intercept_methods``), so the frozen weight gets no weight gradient, input dropout on
the branch behaves as in peft, and the model code knows nothing of adapters. A subclass
says what the adapter is: its new weights (`AdapterStrategy.new_adapter`), the adapted
layer's output (`AdapterStrategy.add_branch`, which may run the layer itself or compute
its output another way) and how it folds into the kernel (`AdapterStrategy.merge`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.models.layers import Linear
from jaxmed.strategies.base import (
    COMPONENTS,
    Params,
    Strategy,
    StrategyError,
    describe_names,
    flatten,
    match_targets,
    module_of,
    unflatten,
)

ModulePath = tuple[str, ...]
# (module path, the Linear, its input, a thunk that runs the layer as it is) -> the output
# with the branch added
Branch = Callable[[ModulePath, Linear, jax.Array, Callable[[], jax.Array]], jax.Array]


def get_path(tree: Mapping, path: ModulePath) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def find_targets(name: str, params: Params, component: str,
                 patterns: str | Iterable[str]) -> list[ModulePath]:
    """Sorted module paths of the Linear layers of ``params[component]`` that ``patterns``
    (peft's target_modules semantics) name. StrategyError (for strategy ``name``) if the
    component is absent, nothing matches, or a match is a convolution."""
    if component not in params:
        raise StrategyError(
            f"{name}: targets on {component!r} but the parameter tree has only "
            f"{sorted(params)}"
        )
    kernels = {p[:-1]: v for p, v in flatten(params[component]).items() if p[-1] == "kernel"}
    hits = sorted(m for m in kernels if match_targets(patterns, module_of(m + ("kernel",))))
    if not hits:
        names = sorted(module_of(m + ("kernel",)) for m in kernels)
        raise StrategyError(
            f"{name}: target pattern {patterns!r} matches no layer of the {component}. "
            f"It is matched (as peft does: exact name or dotted suffix for a list, full "
            f"regex for a string) against the {len(names)} names of its Linear / Conv "
            f"modules, such as {describe_names(names)}"
        )
    convs = [module_of(m + ("kernel",)) for m in hits if len(kernels[m].shape) != 2]
    if convs:
        raise StrategyError(
            f"{name}: target pattern {patterns!r} matches convolution layers "
            f"{convs[:3]}; jaxmed's LoRA/DoRA adapt Linear layers only"
        )
    return hits


def adapter_table(sub: Params, leaves: Iterable[str]) -> dict[ModulePath, dict]:
    """One component's adapter tree as ``{module path: {leaf name: ...}}``: each adapter
    leaf (a name in ``leaves``) with what lies under it (``{'kernel': ...}`` or an array)."""
    leaves = tuple(leaves)
    table: dict[ModulePath, dict] = {}
    for path, v in flatten(sub).items():
        for i, p in enumerate(path):
            if p in leaves:
                entry = table.setdefault(path[:i], {})
                if i == len(path) - 1:
                    entry[p] = v
                else:
                    entry.setdefault(p, {})[path[-1]] = v
                break
    return table


@contextlib.contextmanager
def add_to_linears(paths: Iterable[ModulePath], branch: Branch) -> Iterator[None]:
    """While active, each Linear at one of ``paths`` returns ``branch(path, module, x,
    layer)`` for input ``x``, where ``layer()`` is its own output (computed only if the
    branch calls it); other modules run unchanged."""
    paths = frozenset(paths)
    if not paths:
        yield
        return

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, Linear):
            return next_fun(*args, **kwargs)
        path = tuple(mod.path)
        if path not in paths:
            return next_fun(*args, **kwargs)
        return branch(path, mod, args[0], lambda: next_fun(*args, **kwargs))

    with nn.intercept_methods(interceptor):
        yield


@dataclasses.dataclass(frozen=True)
class AdapterStrategy(Strategy):
    """New weights of rank ``rank`` (scaled by alpha / rank) on the Linear layers that
    ``targets`` (UNet) and ``text_targets`` (text encoder) name; the frozen tree is the
    whole parameter tree, unchanged."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str = ()
    text_targets: tuple[str, ...] | str = ()
    LEAVES: ClassVar[tuple[str, ...]] = ()  # the adapter's leaf names in the trainable tree

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def component_targets(self) -> dict[str, tuple[str, ...] | str]:
        pairs = (("unet", self.targets), ("text_encoder", self.text_targets))
        return {comp: patterns for comp, patterns in pairs if patterns}

    def target_modules(self, params: Params) -> dict[str, list[ModulePath]]:
        """Module paths (per component) that get an adapter; errors if a pattern matches
        nothing or matches a layer that is not a Linear."""
        return {comp: find_targets(self.name, params, comp, patterns)
                for comp, patterns in self.component_targets().items()}

    def init(self, params: Params, rng: jax.Array) -> tuple[Params, Params]:
        trainable = {}
        for comp, modules in self.target_modules(params).items():
            comp_rng = jax.random.fold_in(rng, COMPONENTS.index(comp))
            flat = {}
            for i, m in enumerate(modules):
                kernel = get_path(params[comp], m)["kernel"]
                for leaf, v in self.new_adapter(kernel, jax.random.fold_in(comp_rng, i)).items():
                    flat[m + leaf] = v
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
        table = adapter_table(trainable.get(component, {}), self.LEAVES)
        dropout = train and self.dropout > 0.0 and bool(table)
        if dropout and rng is None:
            raise ValueError(f"{self.name}: LoRA dropout in training needs an rng")
        if dropout:  # independent masks per component and per layer
            rng = jax.random.fold_in(rng, COMPONENTS.index(component))
        index = {m: i for i, m in enumerate(sorted(table))}

        def branch(path, module, x, layer):
            xd = x
            if dropout:
                keep = jax.random.bernoulli(
                    jax.random.fold_in(rng, index[path]), 1.0 - self.dropout, x.shape)
                xd = jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(x.dtype)
            return self.add_branch(table[path], get_path(frozen[component], path), xd,
                                   layer, dropout, module.dtype)

        with add_to_linears(table, branch):
            yield

    def export(self, trainable: Params, frozen: Params) -> Params:
        out = dict(frozen)
        for comp, sub in trainable.items():
            flat = flatten(frozen[comp])
            for m, entry in adapter_table(sub, self.LEAVES).items():
                flat[m + ("kernel",)] = self.merge(flat[m + ("kernel",)], entry)
            out[comp] = unflatten(flat)
        return out

    # -- what a subclass defines

    def new_adapter(self, kernel: jax.Array, rng: jax.Array) -> dict[ModulePath, Any]:
        """The new trainable leaves for a layer with this (in, out) kernel, keyed by their
        path below the layer."""
        raise NotImplementedError

    def add_branch(self, entry: dict, base: dict, xd: jax.Array,
                   layer: Callable[[], jax.Array], dropout: bool, dtype) -> jax.Array:
        """The adapted layer's output: its own output (``layer()``, in compute dtype
        ``dtype``) plus the adapter's branch on ``xd`` (its input, after dropout when
        ``dropout``, else the input itself); ``entry`` holds the adapter's leaves
        (`adapter_table`), ``base`` the layer's frozen kernel and bias."""
        raise NotImplementedError

    def merge(self, w: jax.Array, entry: dict) -> jax.Array:
        """The kernel ``w`` with the adapter folded in."""
        raise NotImplementedError
