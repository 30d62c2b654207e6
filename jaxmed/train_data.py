"""What a training run reads: its records, its latent / text caches and its batches.

`TrainInputs` is built by `jaxmed.train.Trainer` once the model is loaded: it reads the
configured records, opens the caches the strategy allows (`cache_use`), and makes the
batches of a run from its data position. Frozen encoders are not rerun (docs/STUDY.md
"Where jaxmed departs from the study"), and the latent cache is filled for the records the
run's own steps read (all of them with ``cache.prefill``), so a short run starts at once
on a large dataset.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxmed.cache import LatentCache, TextCache, params_hash
from jaxmed.data import Batches, Captioner, build_records
from jaxmed.errors import UserError
from jaxmed.models.sd import StableDiffusion
from jaxmed.strategies.base import Strategy

# The batch entries the train step reads, with their ranks.
MODEL_INPUTS = {"image": 4, "input_ids": 2, "latent_mean": 4, "latent_logvar": 4, "context": 3}


def cache_use(config: ml_collections.ConfigDict, strategy: Strategy) -> tuple[bool, bool]:
    """(latent cache on, text cache on) for this config and strategy: ``auto`` caches what
    the strategy keeps frozen; ``on`` for a component it trains is an error."""
    c, trains = config.cache, strategy.trains
    for key in ("latents", "text"):
        if c[key] not in ("auto", "on", "off"):
            raise UserError(f"cache.{key}={c[key]!r}: choose auto, on or off")
    if c.latents == "on" and "vae" in trains:
        raise UserError(f"cache.latents=on, but strategy {strategy.name!r} trains the "
                        "VAE: its latents change every step (use auto or off)")
    if c.text == "on" and "text_encoder" in trains:
        raise UserError(f"cache.text=on, but strategy {strategy.name!r} trains the "
                        "text encoder (use auto or off)")
    use_lat = c.latents == "on" or (c.latents == "auto" and "vae" not in trains)
    use_txt = c.text == "on" or (c.text == "auto" and "text_encoder" not in trains)
    return use_lat, use_txt


def read_records(config: ml_collections.ConfigDict, workdir: str, is_main: bool):
    """The configured records. With several processes, process 0 reads them first: a
    dataset generated on first use (the phantom, in the workdir) is then written once,
    and the others find it complete (or make their own copy on a folder they do not
    share)."""
    if jax.process_count() == 1:
        return build_records(config, workdir)
    records = build_records(config, workdir) if is_main else None
    multihost_utils.sync_global_devices("jaxmed.train records")
    return records if is_main else build_records(config, workdir)


class TrainInputs:
    """Records, caches and batches of one run (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, sd: StableDiffusion,
                 strategy: Strategy, host_params: dict, global_batch: int, *,
                 records=None, is_main: bool = True):
        self.config, self.sd, self.is_main = config, sd, is_main
        self.global_batch = global_batch
        self.records = records if records is not None else read_records(config, workdir,
                                                                        is_main)
        self.latent_cache = self.text_cache = None
        c = config.cache
        use_lat, use_txt = cache_use(config, strategy)
        self.cache_dir = c.dir or os.path.join(workdir, "cache")
        d, dtype = config.data, config.model.dtype
        if use_lat:
            vae_params = host_params["vae"]
            # Nothing is encoded here unless cache.prefill: `batches` encodes what the
            # run reads, from its data position on.
            self.latent_cache = LatentCache.build_or_load(
                self.cache_dir, self.records, sd.encode_images, vae_params,
                params_hash(vae_params, {"vae": sd.vae.config.to_dict(), "dtype": dtype}),
                resolution=d.resolution, on_bad_image=d.on_bad_image, workers=d.workers,
                progress=config.log.progress and is_main,
                positions=None if c.get("prefill", False) else [])
        if use_txt:
            captioner = self.captioner()
            variants = captioner.variants(self.records.labels, self.records.captions)
            text_params = host_params["text_encoder"]
            self.text_cache = TextCache.build_or_load(
                self.cache_dir, self.records.source, variants,
                sd.encode_text, text_params, sd.tokenize,
                params_hash(text_params, {"text": sd.text_encoder.config.to_dict(),
                                          "dtype": dtype}))
        if is_main:
            print(f"[jaxmed.train] latent cache: {'on' if use_lat else 'off'} "
                  f"(cache.latents={c.latents}); text cache: {'on' if use_txt else 'off'} "
                  f"(cache.text={c.text})"
                  + (f"; in {self.cache_dir}" if use_lat or use_txt else ""), flush=True)

    def captioner(self) -> Captioner:
        d = self.config.data
        return Captioner(self.records.label_columns, templates=tuple(d.templates) or None,
                         dropout=d.caption_dropout, seed=self.config.seed)

    def batches(self, position: Mapping | None = None, num_steps: int | None = None
                ) -> Batches:
        """The training batches from data ``position`` (epoch, step; default the start):
        images or cached latents, token ids or cached context. ``num_steps``: the run reads
        this many batches, no more (the latent cache is filled for exactly those)."""
        d = self.config.data
        extras = unreadable = stop = None
        if self.latent_cache is not None:
            extras, unreadable = self.latent_cache.get, self.latent_cache.unreadable
        b = Batches(self.records, self.global_batch, tokenizer=self.sd.tokenizer,
                    resolution=d.resolution, seed=self.config.seed,
                    captioner=self.captioner(), on_bad_image=d.on_bad_image,
                    num_workers=d.workers, prefetch=d.prefetch,
                    load_images=self.latent_cache is None, extras=extras,
                    unreadable=unreadable, return_captions=self.text_cache is not None)
        if position is not None:
            b.load_state_dict(position)
        if num_steps is not None:
            at = b.state_dict()
            first = at["epoch"] * b.steps_per_epoch + at["step"]
            stop = first + int(num_steps)
            b.num_steps = stop
            if self.latent_cache is not None:
                self.latent_cache.ensure(
                    self.positions_read(b, first, stop), progress=self._progress(),
                    desc=f"encoding latents (once) of the images {num_steps} steps read")
        return b

    def _progress(self) -> bool:
        return bool(self.config.log.progress) and self.is_main

    @staticmethod
    def positions_read(b: Batches, first: int, stop: int) -> np.ndarray:
        """The record positions this process reads in global batches [first, stop)."""
        spe, n = b.steps_per_epoch, len(b.records)
        seen = np.zeros(n, bool)
        for epoch in range(first // spe, (stop - 1) // spe + 1):
            lo, hi = max(first - epoch * spe, 0), min(stop - epoch * spe, spe)
            steps = b.permutation(epoch)[:spe * b.batch_size].reshape(
                spe, b.process_count, b.local_batch_size)
            seen[steps[lo:hi, b.process_index].ravel()] = True
            if seen.all():
                break
        return np.flatnonzero(seen)

    def numeric(self, batches) -> Iterator[dict]:
        """The batches as the train step reads them (cached context for captions)."""
        for b in batches:
            if self.text_cache is not None:
                b["context"] = self.text_cache.lookup(b.pop("caption"))
                b.pop("input_ids", None)
            yield {k: v for k, v in b.items() if k in MODEL_INPUTS}
