"""Sampling and batch synthesis: 1 == 8 devices, guidance 1 == conditional prediction,
parity with diffusers' StableDiffusionPipeline, resumable synthesis, bad-input errors."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxmed import sample, train
from jaxmed.checkpoint import load_for_sampling
from jaxmed.data.captions import caption_from_labels
from jaxmed.data.combinations import read_combinations
from jaxmed.data.labels import LABELS
from jaxmed.diffusion import sampling
from jaxmed.images import grid
from jaxmed.strategies.base import flatten
from tests.helpers import ROOT
from tests.train_worker import config as make_config

SEED = 7
STEPS = 10  # PNDM, guidance 7.5: shared by the parity and synthesis tests (one compile)
GUIDANCE = 7.5
BATCH = 2



@pytest.fixture(scope="module")
def model(tiny_sd_folder):
    return load_for_sampling(tiny_sd_folder)


def shared_fn(sd):
    """The one PNDM/10-step/7.5 sampling function (synthesize reuses the same object)."""
    return sample._cached_sample_fn(sd, "pndm", STEPS, GUIDANCE, 32, 32, SEED, 0.0, None, 1)


# ---------------------------------------------------------------------------------------
# (1) same seed -> same images on 1 and on 8 devices

_DEVICES_SCRIPT = r"""
import json, os, sys
import jax
jax.config.update("jax_compilation_cache_dir", os.environ["JAXMED_COMPILATION_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_default_matmul_precision", "highest")
import numpy as np
from PIL import Image
from jaxmed import sample, sharding
from jaxmed.checkpoint import load_for_sampling
from jaxmed.data.labels import LABELS
from jaxmed.diffusion import sampling

assert jax.device_count() == 8, jax.devices()
folder, out = sys.argv[1], sys.argv[2]
sd, params = load_for_sampling(folder)
mesh1 = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
mesh8 = sharding.make_mesh(4, 2, 1)  # the batch over data x fsdp = 8 shards
report = {}

# Batch synthesis (PNDM, the study's sampler): 5 images; batch 4 on 1 device (a full batch
# and a padded one), batch 8 on 8 devices (3 padding images).
combos = [{"Edema": 1, "count": 2}, {"Cardiomegaly": 1, "Pleural Effusion": 1, "count": 2},
          {"count": 1}]
combos = [{**{c: 0 for c in LABELS}, **r} for r in combos]
kw = dict(sampler="pndm", steps=3, guidance=7.5, seed=11, progress=False)
s1 = sample.synthesize(sd, params, combos, out + "/d1", batch_size=4, mesh=mesh1, **kw)
s8 = sample.synthesize(sd, params, combos, out + "/d8", batch_size=8, mesh=mesh8, **kw)
names = sorted(os.listdir(out + "/d1/images"))
px = lambda d, n: np.asarray(Image.open(os.path.join(out, d, "images", n)))
report["synth"] = {
    "n": [s1["generated"], s8["generated"]], "names": names,
    "png_equal": all((px("d1", n) == px("d8", n)).all() for n in names),
    "metadata_equal": open(out + "/d1/metadata.csv").read() == open(
        out + "/d8/metadata.csv").read()}

# DDPM (per-step noise, per image) through make_sample_fn, and another batch split.
prompts = ["Chest X-ray showing Edema", "Normal chest X-ray with no significant findings",
           "Chest X-ray showing Cardiomegaly, Pleural Effusion", "Chest X-ray showing Edema",
           "Chest X-ray showing Pneumothorax"]
kw = dict(sampler="ddpm", num_steps=3, guidance_scale=7.5, seed=11, micro_batch=1)
f1 = sampling.make_sample_fn(sd, mesh=mesh1, **kw)
f8 = sampling.make_sample_fn(sd, mesh=mesh8, **kw)
cond = np.asarray(sd.tokenize(prompts))
unc = np.asarray(sd.tokenize([""] * len(prompts)))
ids = np.arange(100, 105, dtype=np.int32)
a = np.asarray(f1(params, cond, unc, ids))
b8 = f8(params, cond, unc, ids)
b = np.asarray(b8)
c = np.asarray(f8(params, cond[3:], unc[3:], ids[3:]))  # 2 images + 6 padding
report["ddpm"] = {"devices": len(b8.sharding.device_set), "shape": list(b.shape),
                  "max_abs_1_vs_8": float(np.abs(a - b).max()),
                  "max_abs_split": float(np.abs(a[3:] - c).max()),
                  "differs_by_id": float(np.abs(a[0] - a[3]).max())}
print("RESULT " + json.dumps(report))
"""


@pytest.mark.slow
def test_same_images_on_1_and_8_devices(tiny_sd_folder, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.setdefault("JAXMED_COMPILATION_CACHE", os.path.join(ROOT, ".jax_cache"))
    env["JAXMED_COMPILATION_CACHE"] = os.path.abspath(env["JAXMED_COMPILATION_CACHE"])
    proc = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT, tiny_sd_folder,
                           str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    report = json.loads(line[len("RESULT "):])
    print(report)
    synth, ddpm = report["synth"], report["ddpm"]
    assert synth["n"] == [5, 5] and len(synth["names"]) == 5
    assert synth["png_equal"] and synth["metadata_equal"]
    assert ddpm["devices"] == 8 and ddpm["shape"] == [5, 32, 32, 3]
    assert ddpm["max_abs_1_vs_8"] == 0.0 and ddpm["max_abs_split"] == 0.0
    assert ddpm["differs_by_id"] > 1e-3  # same prompt, other id: other noise, other image


# ---------------------------------------------------------------------------------------
# (2) guidance scale 1 == the plain conditional prediction


def test_guidance_one_is_the_conditional_prediction(model):
    sd, params = model
    cond = sd.tokenize(["Chest X-ray showing Edema", "Chest X-ray showing Pneumothorax"])
    unc = sd.tokenize(["", ""])
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
    t = jnp.int32(501)

    @jax.jit
    def denoisers(params, cond, unc, x):
        ctx = sd.encode_text(params["text_encoder"], cond)
        uctx = sd.encode_text(params["text_encoder"], unc)
        both = sampling.guided_model_fn(sd, params["unet"], ctx, uctx, 1.0,
                                      skip_uncond_at_one=False)(x, t)
        g75 = sampling.guided_model_fn(sd, params["unet"], ctx, uctx, 7.5)(x, t)
        plain_c = sd.predict(params["unet"], x, t, ctx)
        plain_u = sd.predict(params["unet"], x, t, uctx)
        return both, g75, plain_c, plain_u

    both, g75, c, u = map(np.asarray, denoisers(params, cond, unc, x))
    err = np.abs(both - c).max()
    print(f"g=1 CFG vs conditional: max abs {err:.2e} (|eps| ~ {np.abs(c).max():.2f})")
    assert err <= 1e-5
    assert np.abs(c - u).max() > 1e-3  # the branches do differ, so the check means something
    # g75 runs both branches as one batch of 4, c and u as batches of 2: XLA:CPU's float32
    # matmuls round by up to ~1.2e-6 differently per batch size (measured on this model),
    # and u + 7.5 (c - u) carries each branch's rounding up to 1 + 2 x 7.5 = 16 times.
    np.testing.assert_allclose(g75, u + 7.5 * (c - u), atol=16 * 2e-6)

    # Whole sampling runs: two-branch CFG at g=1 vs a run that never computes the
    # unconditional branch (and whose uncond input is garbage to prove it is unused).
    kw = dict(sampler="pndm", num_steps=3, guidance_scale=1.0, seed=SEED)
    f_both = sampling.make_sample_fn(sd, skip_uncond_at_one=False, **kw)
    f_cond = sampling.make_sample_fn(sd, **kw)
    ids = jnp.arange(2, dtype=jnp.int32)
    a = np.asarray(f_both(params, cond, unc, ids))
    b = np.asarray(f_cond(params, cond, jnp.zeros_like(unc) + 123, ids))
    print(f"g=1 images, both branches vs conditional only: max abs {np.abs(a - b).max():.2e}")
    np.testing.assert_allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------------------------------
# (3) the whole loop against diffusers' StableDiffusionPipeline


def test_parity_with_diffusers_pipeline(model, tiny_sd_folder, torch):
    from diffusers import StableDiffusionPipeline

    sd, params = model
    prompts = ["Chest X-ray showing Edema, Pleural Effusion",
               "Normal chest X-ray with no significant findings"]
    ids = np.arange(BATCH, dtype=np.int32)
    cond, unc = np.asarray(sd.tokenize(prompts)), np.asarray(sd.tokenize([""] * BATCH))
    fn = shared_fn(sd)
    ours = np.asarray(fn(params, cond, unc, jnp.asarray(ids)))
    latents = np.asarray(sampling.initial_noise(SEED, jnp.asarray(ids), fn.latent_shape))
    # Started from the latents the seed gives these ids (under other ids, so only the
    # latents can make them agree): the same images.
    given = np.asarray(fn(params, cond, unc, jnp.asarray(ids + 50), latents=latents))
    print(f"from given latents vs from the seed: max abs {np.abs(given - ours).max():.2e}")
    np.testing.assert_allclose(given, ours, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected \(2, 8, 8, 4\)"):
        fn(params, cond, unc, jnp.asarray(ids), latents=latents.transpose(0, 3, 1, 2))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    with torch.no_grad():
        ref = pipe(prompts, height=32, width=32, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, output_type="np",
                   latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())).images
    err = np.abs(ours - ref).max()
    print(f"jaxmed vs diffusers pipeline (PNDM {STEPS} steps, g {GUIDANCE}): max abs {err:.2e}")
    assert ours.shape == ref.shape == (BATCH, 32, 32, 3)
    assert err <= 1e-3
    assert ref.std() > 1e-3  # not a constant image


# ---------------------------------------------------------------------------------------
# (4) synthesis from a combination CSV: counts, metadata, captions, resume


def _write_combos(path, rows, columns=(*LABELS, "count"), extra=()):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*columns, *extra])
        for r in rows:
            w.writerow(r)
    return str(path)


def _labels(**pos):
    return [pos.get(c.replace(" ", "_"), 0) for c in LABELS]


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im)


def test_synthesize_counts_metadata_and_resume(model, tmp_path):
    sd, params = model
    rows = [
        [*_labels(No_Finding=1), 2],
        [*_labels(Edema=1, Pleural_Effusion=1), 3],
        [*_labels(Cardiomegaly=""), 0],  # count 0: no images; a blank label
        [*_labels(), 1],  # nothing positive: the "Normal ..." caption
    ]
    combos = _write_combos(tmp_path / "combos.csv", rows, extra=())
    out = str(tmp_path / "synth")
    kw = dict(batch_size=BATCH, sampler="pndm", steps=STEPS, guidance=GUIDANCE, seed=SEED,
              progress=False)
    s1 = sample.synthesize(sd, params, combos, out, **kw)
    assert (s1["total"], s1["generated"], s1["skipped"]) == (6, 6, 0)

    with open(os.path.join(out, "metadata.csv"), newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        meta = list(reader)
    assert header == ["Path", *LABELS, "caption", "image_id", "seed", "noise_id"]
    assert [m[-1] for m in meta] == [str(i) for i in range(6)]  # unpaired: noise id = id
    assert [m[0] for m in meta] == [f"images/{i:06d}.png" for i in range(6)]
    expect_rows = [0, 0, 1, 1, 1, 3]  # ids assigned row by row in CSV order
    for m, r in zip(meta, expect_rows):
        labels = [float(v) if v != "" else np.nan for v in rows[r][:8]]
        assert m[1:9] == [str(v) for v in rows[r][:8]]
        assert m[9] == caption_from_labels(labels)
        assert m[11] == str(SEED)
    assert meta[0][9] == "Chest X-ray showing No Finding"
    assert meta[2][9] == "Chest X-ray showing Edema, Pleural Effusion"
    assert meta[5][9] == "Normal chest X-ray with no significant findings"

    paths = [os.path.join(out, m[0]) for m in meta]
    first = {p: _pixels(p) for p in paths}
    for p in paths:
        with Image.open(p) as im:
            assert (im.mode, im.size) == ("RGB", (32, 32))
    # The images are those of the plain sampling function for the same ids and captions.
    direct = sampling.to_uint8(shared_fn(sd)(
        params, np.asarray(sd.tokenize([meta[2][9], meta[3][9]])),
        np.asarray(sd.tokenize(["", ""])), jnp.asarray([2, 3], jnp.int32)))
    np.testing.assert_array_equal(direct[0], first[paths[2]])
    np.testing.assert_array_equal(direct[1], first[paths[3]])
    # Readable by the study's CSV reader (synthetic images carry no view column).
    from jaxmed.data import read_chexpert_csv

    recs = read_chexpert_csv(os.path.join(out, "metadata.csv"), frontal_only=False)
    assert len(recs) == 6 and recs.load(0, 32).shape == (32, 32, 3)

    # A killed run: two PNGs missing, one truncated, a stray temporary file, no metadata.
    mtimes = {p: os.stat(p).st_mtime_ns for p in paths}
    os.remove(paths[1])
    os.remove(paths[4])
    with open(paths[3], "rb") as f:
        data = f.read()
    with open(paths[3], "wb") as f:
        f.write(data[: len(data) // 2])
    with open(os.path.join(out, "images", ".000005.png.tmp999"), "wb") as f:
        f.write(b"\x89PNG partial")
    os.remove(os.path.join(out, "metadata.csv"))
    s2 = sample.synthesize(sd, params, combos, out, **kw)
    assert (s2["total"], s2["generated"], s2["skipped"]) == (6, 3, 3)
    redone = {paths[1], paths[3], paths[4]}
    for p in paths:
        if p in redone:
            assert os.stat(p).st_mtime_ns != mtimes[p]
        else:
            assert os.stat(p).st_mtime_ns == mtimes[p], f"{p} was rewritten"
        np.testing.assert_array_equal(_pixels(p), first[p])
    with open(os.path.join(out, "metadata.csv"), newline="") as f:
        assert list(csv.reader(f))[1:] == meta

    # Nothing left to do; other settings into the same folder are refused.
    assert sample.synthesize(sd, params, combos, out, **kw)["generated"] == 0
    with pytest.raises(ValueError, match="other settings.*steps"):
        sample.synthesize(sd, params, combos, out, **{**kw, "steps": 3})


def test_paired_noise_and_grey_films(model, tmp_path):
    """paired_noise: image j of every row starts from noise j, so two rows with the same
    prompt give the same images and rows with other prompts differ only by prompt; grey
    synthesis writes the luma of the RGB images (one channel) and is a switch."""
    sd, params = model
    rows = [[*_labels(Edema=1), 2], [*_labels(Cardiomegaly=1), 2], [*_labels(Edema=1), 2]]
    combos = _write_combos(tmp_path / "combos.csv", rows)
    kw = dict(batch_size=BATCH, sampler="pndm", steps=STEPS, guidance=GUIDANCE, seed=SEED,
              progress=False, paired_noise=True)
    rgb = str(tmp_path / "rgb")
    sample.synthesize(sd, params, combos, rgb, **kw)
    with open(os.path.join(rgb, "metadata.csv"), newline="") as f:
        meta = list(csv.DictReader(f))
    assert [m["noise_id"] for m in meta] == ["0", "1"] * 3
    px = [_pixels(os.path.join(rgb, m["Path"])) for m in meta]
    np.testing.assert_array_equal(px[0], px[4])  # same prompt, same noise: same image
    np.testing.assert_array_equal(px[1], px[5])
    assert not np.array_equal(px[0], px[2]) and not np.array_equal(px[0], px[1])
    # The same images as the sampling function given noise ids 0, 1 for the Edema prompt.
    direct = sampling.to_uint8(shared_fn(sd)(
        params, np.asarray(sd.tokenize([meta[0]["caption"]] * 2)),
        np.asarray(sd.tokenize(["", ""])), jnp.asarray([0, 1], jnp.int32)))
    np.testing.assert_array_equal(direct[0], px[0])
    np.testing.assert_array_equal(direct[1], px[1])
    # Resuming a per-image-noise folder with paired noise is refused (it would mix them).
    with pytest.raises(ValueError, match="other settings.*noise"):
        sample.synthesize(sd, params, combos, rgb, **{**kw, "paired_noise": False})

    grey = str(tmp_path / "grey")
    sample.synthesize(sd, params, combos, grey, **kw, grayscale=True)
    for m, rgb_px in zip(meta, px):
        with Image.open(os.path.join(grey, m["Path"])) as im:
            assert im.mode == "L"
            g = np.asarray(im)
        np.testing.assert_array_equal(g, sampling.to_stored(rgb_px / 255.0, "grey"))


def test_to_stored_grey_is_pil_luma_and_keeps_grey_images():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (3, 9, 7, 3), dtype=np.uint8)
    x = rgb.astype(np.float32) / 255.0
    np.testing.assert_array_equal(sampling.to_stored(x, "rgb"), rgb)
    pil = np.stack([np.asarray(Image.fromarray(a).convert("L")) for a in rgb])
    np.testing.assert_array_equal(sampling.to_stored(x, "grey"), pil)  # bit for bit
    g = rng.integers(0, 256, (2, 5, 5, 1), dtype=np.uint8).repeat(3, axis=-1)
    np.testing.assert_array_equal(sampling.to_stored(g / 255.0, "grey"), g[..., 0])
    with pytest.raises(ValueError, match="choose 'grey'"):
        sampling.to_stored(x, "gray")


def test_cli_synthesis_and_grid(model, tiny_sd_folder, tmp_path, capsys):
    """The CLI (1-device mesh path) writes the same images as the API."""
    sd, params = model
    combos = _write_combos(tmp_path / "c.csv", [[*_labels(Edema=1), 2], [*_labels(), 1]],
                           extra=("note",))
    out = str(tmp_path / "cli")
    common = ["--model", tiny_sd_folder, "--steps", str(STEPS), "--seed", str(SEED),
              "--batch-size", str(BATCH), "--no-progress"]
    assert sample.main([*common, "--combinations", combos, "--out", out]) == 0
    with open(os.path.join(out, "metadata.csv"), newline="") as f:
        meta = list(csv.DictReader(f))
    assert [m["caption"] for m in meta] == ["Chest X-ray showing Edema"] * 2 + [
        "Normal chest X-ray with no significant findings"]
    api = sampling.to_uint8(shared_fn(sd)(
        params, np.asarray(sd.tokenize([m["caption"] for m in meta[:2]])),
        np.asarray(sd.tokenize(["", ""])), jnp.asarray([0, 1], jnp.int32)))
    for i in range(2):
        np.testing.assert_array_equal(_pixels(os.path.join(out, meta[i]["Path"])), api[i])

    grid_png = str(tmp_path / "grid.png")
    assert sample.main([*common, "--prompt", "Chest X-ray showing Edema", "--num", "2",
                        "--out", grid_png]) == 0
    with Image.open(grid_png) as im:
        assert im.size[0] == 64 and im.mode == "RGB"


def test_load_for_sampling_workdir(tiny_sd_folder, tmp_path):
    wd = tmp_path / "run"
    (wd / "checkpoints").mkdir(parents=True)
    (wd / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no export/ and no finished checkpoint"):
        load_for_sampling(str(wd))
    os.symlink(tiny_sd_folder, wd / "export")
    sd, params = load_for_sampling(str(wd))
    assert sd.path.rstrip("/").endswith("export") and set(params) == {
        "unet", "vae", "text_encoder"}
    with pytest.raises(FileNotFoundError, match="neither a diffusers folder"):
        load_for_sampling(str(tmp_path))


def test_load_for_sampling_from_a_checkpoint(tiny_sd_folder, tiny_dataset, tmp_path):
    """A workdir without export/: the latest checkpoint restored and the adapter folded in
    gives exactly the params the training run exports."""
    wd = str(tmp_path / "lora")
    c = make_config("lora", tiny_sd_folder, tiny_dataset, **{
        "train.max_steps": 1, "checkpoint.every_steps": 1, "optim.grad_accum": 1,
        "export.diffusers": True, "strategy.lr": 1e-2})
    train.train(c, wd)
    os.rename(os.path.join(wd, "export"), str(tmp_path / "exported"))
    _, restored = load_for_sampling(wd)
    _, exported = load_for_sampling(str(tmp_path / "exported"))
    _, base = load_for_sampling(tiny_sd_folder)
    r, e, b = flatten(restored), flatten(exported), flatten(base)
    assert set(r) == set(e)
    for k in e:
        np.testing.assert_array_equal(np.asarray(r[k]), np.asarray(e[k]), err_msg=str(k))
    changed = [k for k in b if not np.array_equal(np.asarray(r[k]), np.asarray(b[k]))]
    assert changed and all(k[-2] in ("to_q", "to_k", "to_v", "to_out_0") for k in changed)


# ---------------------------------------------------------------------------------------
# (5) bad input


def test_bad_combination_csvs(tmp_path, capsys):
    no_count = _write_combos(tmp_path / "nocount.csv", [[*_labels(Edema=1)]],
                             columns=LABELS)
    with pytest.raises(ValueError, match=rf"{re.escape(no_count)}.*column 'count'"):
        read_combinations(no_count)
    no_edema = _write_combos(tmp_path / "noedema.csv", [[0] * 7 + [2]],
                             columns=[c for c in LABELS if c != "Edema"] + ["count"])
    with pytest.raises(ValueError, match=r"noedema.csv has no column 'Edema'"):
        read_combinations(no_edema)
    neg = _write_combos(tmp_path / "neg.csv", [[*_labels(), 1], [*_labels(Edema=1), -2]])
    with pytest.raises(ValueError, match=r"neg.csv, data row 1 \(line 3\): count '-2' is neg"):
        read_combinations(neg)
    frac = _write_combos(tmp_path / "frac.csv", [[*_labels(), 1.5]])
    with pytest.raises(ValueError, match="not a whole number"):
        read_combinations(frac)
    bad_label = _write_combos(tmp_path / "lab.csv", [[*_labels(Edema="yes"), 1]])
    with pytest.raises(ValueError, match=r"column 'Edema'.*'yes'"):
        read_combinations(bad_label)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_combinations(str(tmp_path / "nope.csv"))
    # The CLI reports the same before loading any model.
    rc = sample.main(["--model", str(tmp_path), "--combinations", no_count, "--out",
                      str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "'count'" in err and no_count in err


def test_unknown_sampler(model, tmp_path, capsys):
    sd, params = model
    for call in (lambda: sampling.make_sample_fn(sd, sampler="euler"),
                 lambda: sample.synthesize(sd, params, [], str(tmp_path), sampler="euler")):
        with pytest.raises(ValueError, match="unknown sampler 'euler'.*ddpm, ddim, pndm, "
                                             "dpmpp_2m"):
            call()
    rc = sample.main(["--model", "x", "--prompt", "p", "--out", "g.png", "--sampler", "k"])
    assert rc == 2 and "ddpm, ddim, pndm, dpmpp_2m" in capsys.readouterr().err
    with pytest.raises(ValueError, match="positive multiple of 8"):
        sampling.make_sample_fn(sd, height=30)


def test_grid_flat_batch_and_labelled_rows():
    """One grid function: a flat batch with captions (sampling) and labelled rows with
    blank cells and other-sized images (the study's sheets)."""
    ims = np.zeros((5, 16, 16, 3), np.uint8) + np.arange(5, dtype=np.uint8)[:, None, None, None]
    flat = grid(ims, [f"p{i}" for i in range(5)], cols=2)
    assert flat.size == (2 * 16, 3 * (16 + 14)) and flat.mode == "RGB"
    assert np.asarray(flat)[30 + 5, 16 + 5].tolist() == [3, 3, 3]  # row 1, col 1 = image 3
    other = np.full((20, 24, 1), 200, np.uint8)
    rows = grid([[ims[0], None], [other]], row_labels=["real", "lora"], col_labels=["a", "b"])
    assert rows.size == (60 + 2 * 16, 16 + 2 * 16)
    assert np.asarray(rows)[16 + 16 + 5, 60 + 5].tolist() == [200, 200, 200]  # resized to 16
