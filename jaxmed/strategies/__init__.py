"""The one registry of fine-tuning strategies: a name in a config -> a `Strategy`.

The study's 11 (docs/STUDY.md "The 11 strategies and their hyperparameters"): unet, text,
vae, unet+text, unet+vae, vae+text, unet+vae+text, lora, dora, bitfit, difffit. Beyond the
study: difffit-orig, svdiff, attn.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import ml_collections

from jaxmed.strategies import bitfit as _bitfit
from jaxmed.strategies import difffit as _difffit
from jaxmed.strategies import dora as _dora
from jaxmed.strategies import full as _full
from jaxmed.strategies import lora as _lora
from jaxmed.strategies import svdiff as _svdiff
from jaxmed.strategies.base import (
    COMPONENTS,
    MaskStrategy,
    Strategy,
    StrategyError,
    count,
    nbytes,
)

STUDY = (
    "unet", "text", "vae", "unet+text", "unet+vae", "vae+text", "unet+vae+text",
    "lora", "dora", "bitfit", "difffit",
)
EXTRAS = ("difffit-orig", "svdiff", "attn")

_FACTORIES: dict[str, Callable[..., Strategy]] = {
    **{n: functools.partial(_full.full, n) for n in _full.STUDY_FULL},
    "lora": _lora.lora,
    "dora": _dora.dora,
    "bitfit": _bitfit.bitfit,
    "difffit": _difffit.difffit,
    "difffit-orig": _difffit.difffit_orig,
    "svdiff": _svdiff.svdiff,
    "attn": _full.attn,
}


def names() -> tuple[str, ...]:
    return STUDY + EXTRAS


def options(name: str) -> dict[str, object]:
    """The options a strategy accepts, with their defaults."""
    sig = inspect.signature(_factory(name))
    return {k: p.default for k, p in sig.parameters.items()}


def get(name: str, **opts) -> Strategy:
    """Build strategy ``name`` with options (e.g. rank=4 for lora; lrs={'unet': 1e-5})."""
    factory = _factory(name)
    known = options(name)
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise StrategyError(
            f"strategy {name!r} has no option(s) {unknown}; its options are {known}"
        )
    return factory(**opts)


def build_strategy(cfg: ml_collections.ConfigDict) -> Strategy:
    """``config.strategy`` (name + options) -> a registry Strategy."""
    opts = {}
    for k, v in cfg.items():
        if k == "name":
            continue
        if isinstance(v, ml_collections.ConfigDict):
            v = v.to_dict()
        if isinstance(v, list):
            v = tuple(v)
        if v is None:
            continue
        opts[k] = v
    return get(cfg.name, **opts)


def _factory(name: str) -> Callable[..., Strategy]:
    try:
        return _FACTORIES[name]
    except KeyError:
        raise StrategyError(
            f"unknown strategy {name!r}; valid names: {', '.join(names())}"
        ) from None


__all__ = [
    "COMPONENTS", "EXTRAS", "STUDY", "MaskStrategy", "Strategy", "StrategyError",
    "build_strategy", "count", "get", "names", "nbytes", "options",
]
