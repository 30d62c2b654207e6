"""What the adapter strategies (LoRA, DoRA) share: `AdapterStrategy`, new weights on the
Linear layers that target patterns name, applied while a component runs (never stored merged).

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
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.kernels import dispatch
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


# ---------------------------------------------------------------------------------------
# The low-rank adapted matmul (LoRA without dropout)


def merge_kernel(w: jax.Array, a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """W + s A B: the kernel with the adapter folded in (what `LoraStrategy.export` writes)."""
    return w + scaling * a @ b


# Why a custom gradient: autodiff of the unmerged y = x W + s (x A) B adds, per targeted
# layer, a (tokens, r) x (r, out) product to the forward pass and, to the backward pass, the
# branch's share of dx plus products contracting the token axis with outputs only r wide,
# which XLA:CPU runs through transposed copies; each costs about as much as the layer's own
# matmul there (tokens x in x out), so a LoRA step saved little over full fine-tuning.
# Folding the adapter into the kernel first is one matmul forward and one for dx backward,
# the adapter's gradients are four rank-r products, and the frozen kernel's full gradient
# x^T dy is returned but unused, so jit drops it.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lora_matmul(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array,
                scaling: float) -> jax.Array:
    """x (..., in) @ (w + scaling * a @ b) in x's dtype, for a kernel w (in, out) and LoRA
    factors a (in, r), b (r, out): a LoRA layer's output without its bias."""
    return jnp.dot(x, merge_kernel(w, a, b, scaling).astype(x.dtype))


def _lora_matmul_fwd(x, w, a, b, scaling):
    return lora_matmul(x, w, a, b, scaling), (x, w, a, b)


def _lora_matmul_bwd(scaling, res, dy):
    x, w, a, b = res
    dt = dy.dtype
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dx = jnp.dot(dy, merge_kernel(w, a, b, scaling).astype(dt).T)
    u = jnp.dot(x2, a.astype(dt))  # (tokens, r): x A
    t = jnp.dot(dy2, b.astype(dt).T)  # (tokens, r): dy B^T
    da = scaling * dispatch.weight_grad(t, x2).T  # s x^T dy B^T, (in, r)
    db = scaling * dispatch.weight_grad(u, dy2)  # s A^T x^T dy, (r, out)
    dw = dispatch.weight_grad(x2, dy2)  # frozen in LoRA training: never computed there
    return dx, dw.astype(w.dtype), da.astype(a.dtype), db.astype(b.dtype)


lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)
