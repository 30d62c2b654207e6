"""jaxmed.study end to end on the `ci` preset (two strategies + base, a handful of steps):
results.csv / results.md / plots / grids, the three findings stated, resumable."""

from __future__ import annotations

import csv
import json
import os
import time

import pytest
from PIL import Image

from jaxmed import study, study_curve
from jaxmed.cli import ConfigError, load_config, set_override
from jaxmed.data import phantom
from jaxmed.data.labels import CONDITIONS
from jaxmed.eval import alignment
from jaxmed.eval.findings import FAMILY_OF


def _with_bounds(*names):
    return [c for n in names for c in (n, f"{n}_lo", f"{n}_hi")]


EXPECTED_COLUMNS = ["name", "trains", "trainable_params", "train_seconds", "steps",
                    "n_generated",
                    *_with_bounds("fid_inception", "fid_domain", "kid_inception", "kid_domain",
                                  "vendi_domain", "vendi_inception"),
                    "align_auroc", "align_accuracy", "clip_score",
                    "auroc_synthetic", "auroc_real+syn@25%", "auroc_real@25%",
                    "auroc_real@100%"]
FLOOR = "real: valid vs test"


def ci_config(model_path: str):
    c = load_config("configs/study.py:ci")
    set_override(c, "model.path", model_path)
    set_override(c, "log.progress", "False")
    return c


@pytest.fixture(scope="module")
def ci_run(tiny_sd_folder, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("study"))
    t = time.perf_counter()
    out = study.run_study(ci_config(tiny_sd_folder), wd)
    return wd, out, time.perf_counter() - t


def test_ci_study_end_to_end(ci_run):
    wd, out, _ = ci_run
    with open(os.path.join(wd, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["base", "lora", "bitfit", FLOOR]
    assert list(rows[0]) == EXPECTED_COLUMNS
    rows, floor = rows[:3], rows[3]
    # the real-vs-real floor: as many validation films per condition as the models generate
    # (ci's 12 validation films hold 10 such), its own FID / KID with bounds
    assert 0 < int(floor["n_generated"]) <= 18 and float(floor["fid_domain"]) >= 0
    assert float(floor["fid_domain_lo"]) <= float(floor["fid_domain"]) <= float(
        floor["fid_domain_hi"])
    assert rows[0]["trainable_params"] == "0"
    assert int(rows[1]["trainable_params"]) > 0 and int(rows[2]["trainable_params"]) > 0
    assert all(float(r["train_seconds"]) >= 0 for r in rows)
    for r in rows:
        assert r["n_generated"] == "18"  # 3 per condition x 6 conditions
        assert float(r["fid_domain"]) >= 0 and float(r["vendi_domain"]) >= 1
        for m in ("fid_domain", "kid_domain", "vendi_domain"):  # 95% intervals around it
            assert float(r[f"{m}_lo"]) <= float(r[m]) <= float(r[f"{m}_hi"]), m
        assert 0 <= float(r["align_auroc"]) <= 1
        assert r["fid_inception"] == ""  # the ci preset disables Inception (stated in md)
        for col in ("auroc_synthetic", "auroc_real+syn@25%", "auroc_real@25%"):
            assert r[col] != "", col
    # real-only scores are strategy-independent
    assert len({r["auroc_real@25%"] for r in rows}) == 1

    md = open(os.path.join(wd, "results.md")).read()
    assert "## The study's three findings" in md
    for claim in ("lower mean domain FID", "prompt-image alignment", "scarcest real fraction"):
        assert claim in md, claim
    verdicts = [ln for ln in md.splitlines() if ln[:3] in ("1. ", "2. ", "3. ")]
    assert len(verdicts) == 3
    # ci has no UNet-training or frozen-UNet strategy: finding 1's family ranking cannot be
    # tested; one repeat leaves finding 3 without an interval
    assert "**NOT TESTED**" in verdicts[0]
    # finding 2 on the paired design: 3 noise seeds, so the sign-flip test's smallest
    # p-value is 1/8 and no verdict beyond INCONCLUSIVE is reachable (said in the notes)
    assert "**INCONCLUSIVE**" in verdicts[1] and "within-seed" in verdicts[1]
    assert "paired permutation p = " in md and "smallest p-value is 2^-3" in md
    assert "**INCONCLUSIVE**" in verdicts[2]
    assert "lowest FID against the real validation films" in md
    assert f"| {FLOOR} |" in md and " [" in md  # value [lo, hi] cells
    assert "macro AUROC on" in md and "FID-Inception missing" in md
    assert len(out["findings"]) == 3

    for f in ("fid_vs_params.png", "auroc_vs_fraction.png", "samples_all.png",
              "lora/samples.png", "bitfit/samples.png", "base/samples.png",
              "lora/eval/metrics.md", "combinations.csv", "judge/test.json"):
        assert os.path.getsize(os.path.join(wd, f)) > 0, f
    done = json.load(open(os.path.join(wd, "lora", "done.json")))
    assert done["trains"] == ["unet"] and done["steps"] == 3
    assert done["metrics"]["rows"]["all"]["n_generated"] == 18

    # Paired, grey synthesis; alignment with intervals and controls; the judge's views.
    with open(os.path.join(wd, "lora", "synth", "metadata.csv")) as f:
        meta = list(csv.DictReader(f))
    assert [m["noise_id"] for m in meta] == ["0", "1", "2"] * 6  # 3 seeds x 6 prompts
    assert Image.open(os.path.join(wd, "lora", "synth", meta[0]["Path"])).mode == "L"
    row = done["metrics"]["rows"]["all"]
    assert row["align_groups"] == 3 and len(row["align_paired_auroc_ci"]) == 2
    assert 0 <= row["align_paired_p_value"] <= 1
    assert "### Alignment as a paired test" in md and "Positive control" in md
    views = json.load(open(os.path.join(wd, "judge", "test.json")))["views"]
    assert set(views) >= {"real", "synthesis_resolution", "vae_reconstruction", "ok"}
    d = alignment.paired_difference_of(os.path.join(wd, "lora", "eval"),
                                       os.path.join(wd, "base", "eval"), CONDITIONS,
                                       n_boot=20)
    assert d["n_groups"] == 3 and len(d["within_seed"]["interval"]) == 2


def test_rerun_skips_finished_and_resumes_unfinished(ci_run, tiny_sd_folder, capsys):
    wd, _, first_seconds = ci_run
    mtime = os.path.getmtime(os.path.join(wd, "lora", "done.json"))
    capsys.readouterr()
    t = time.perf_counter()
    study.run_study(ci_config(tiny_sd_folder), wd)
    again = time.perf_counter() - t
    log = capsys.readouterr().out
    assert log.count("finished earlier (done.json), skipped") == 3
    assert "fine-tuning" not in log and "synthesising" not in log
    assert os.path.getmtime(os.path.join(wd, "lora", "done.json")) == mtime
    assert again < max(15.0, 0.25 * first_seconds), (again, first_seconds)

    # unfinished models (no done.json) are redone, reusing their finished fine-tuning runs;
    # scored one after the other this time (overlap_scoring off), their results are those
    # the first run scored in the background while the next model fine-tuned
    first = {m: json.load(open(os.path.join(wd, m, "done.json"))) for m in ("lora", "bitfit")}
    for m in first:
        os.remove(os.path.join(wd, m, "done.json"))
    before = json.load(open(os.path.join(wd, "bitfit", "train", "summary.json")))
    c = ci_config(tiny_sd_folder)
    set_override(c, "overlap_scoring", "False")
    study.run_study(c, wd)
    log = capsys.readouterr().out
    assert log.count("skipped") == 1
    assert "bitfit: reusing the finished fine-tuning run" in log
    done = json.load(open(os.path.join(wd, "bitfit", "done.json")))
    assert done["train_seconds"] == before["train_seconds"]
    for m, old in first.items():
        new = json.load(open(os.path.join(wd, m, "done.json")))
        assert _untimed(new["metrics"]) == _untimed(old["metrics"]), m
        assert _untimed(new["regimes"]) == _untimed(old["regimes"]), m
    with open(os.path.join(wd, "results.csv")) as f:
        assert [r["name"] for r in csv.DictReader(f)] == ["base", "lora", "bitfit", FLOOR]


def test_curve_reproduces_the_study_at_its_last_step(ci_run, tmp_path, capsys):
    """jaxmed.study_curve with the study's N: the base point and each strategy's last kept
    checkpoint (restored, synthesised again, scored again) give the study's numbers exactly."""
    wd, _, _ = ci_run
    n = ci_config("unused").synth.per_condition
    capsys.readouterr()
    assert study_curve.main(["--workdir", wd, "--per-condition", str(n)]) == 0
    log = capsys.readouterr().out
    curve = json.load(open(os.path.join(wd, "curve.json")))
    pts = {(p["name"], p["step"]): p for p in curve["points"]}
    # ci: 3 steps, a checkpoint every 3, so one kept checkpoint per strategy, plus the base
    assert sorted(pts) == [("base", 0), ("bitfit", 3), ("lora", 3)]
    assert log.count("curve point ") == 3
    for (m, k), p in pts.items():
        done = json.load(open(os.path.join(wd, m, "done.json")))
        assert done["steps"] == k
        again = json.load(open(os.path.join(wd, m, "curve", f"step_{k}", "eval",
                                            "metrics.json")))
        assert _untimed(again["rows"]) == _untimed(done["metrics"]["rows"]), m
        row = done["metrics"]["rows"]["all"]
        for key in ("fid_domain", "kid_domain", "vendi_domain", "align_auroc"):
            assert p[key] == row[key], (m, key)
        assert p["fid_domain_ci"] == [row["ci"]["fid_domain"]["lo"],
                                      row["ci"]["fid_domain"]["hi"]]
        assert p["align_auroc_ci"] == row["align_auroc_ci"]
        assert p["fid_inception"] is None  # the ci preset has no Inception
        if m != "base":  # the checkpoint was restored: its images are not the base's
            base_rows = json.load(open(os.path.join(wd, "base", "done.json")))["metrics"]
            assert _untimed(again["rows"]) != _untimed(base_rows["rows"]), m
    md = open(os.path.join(wd, "curve.md")).read()
    assert "| lora | 3 |" in md and "| base | 0 |" in md
    assert Image.open(os.path.join(wd, "curve.png")).size[0] > 0

    # not a study; a study without any kept checkpoint: one error line, exit 2
    empty = tmp_path / "empty"
    empty.mkdir()
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "study_config.json").write_text(open(os.path.join(wd, "study_config.json")).read())
    for folder, says in ((empty, "not a study workdir"), (bare, "kept a checkpoint")):
        assert study_curve.main(["--workdir", str(folder)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and says in err[0], err


def _untimed(tree):
    """``tree`` without its wall-time entries (the only thing allowed to differ)."""
    if isinstance(tree, dict):
        return {k: _untimed(v) for k, v in tree.items() if k != "seconds"}
    if isinstance(tree, list):
        return [_untimed(v) for v in tree]
    return tree


def test_presets_and_unknown_keys():
    demo = load_config("configs/study.py:demo")
    assert demo.model.path == "jaxmed:tiny-sd" and demo.data.resolution >= 128
    assert len(demo.strategies) == 14 and demo.include_base
    paper = load_config("configs/study.py:paper")
    assert paper.data.resolution == 512 and paper.finetune.epochs == 101
    assert paper.finetune.grad_accum == 4 and paper.synth.steps == 50
    assert paper.synth.guidance == 7.5 and paper.synth.per_condition == 5000
    assert tuple(paper.regimes.fractions) == (0.01, 0.05, 0.10, 0.25, 0.50, 1.0)
    # the findings preset holds every family finding 1 ranks, and repeats for finding 3
    fnd = load_config("configs/study.py:findings")
    fams = {FAMILY_OF[s] for s in fnd.strategies}
    assert fams == {"unet", "adapter", "frozen"} and fnd.include_base
    assert {"unet", "lora", "dora", "text", "unet+text", "bitfit"} <= set(fnd.strategies)
    assert fnd.regimes.repeats >= 3 and fnd.synth.per_condition >= 30
    with pytest.raises(ConfigError, match="finetune"):
        set_override(demo, "finetune.max_step", "3")
    with pytest.raises(ValueError, match="unknown preset"):
        load_config("configs/study.py:nope")


def test_finetune_config_overrides(tmp_path):
    c = ci_config("random:test@32")
    set_override(c, "finetune.lr_multiplier", "10.0")
    set_override(c, "finetune.overrides", "train.ema_decay=0.5")
    s = study.Study(c, str(tmp_path))
    lora = s.finetune_config("lora")
    assert lora.strategy.lr == pytest.approx(1e-3)
    assert lora.train.max_steps == 3 and lora.train.ema_decay == 0.5
    assert lora.data.phantom_dir == os.path.join(str(tmp_path), "data")
    assert lora.cache.dir == os.path.join(str(tmp_path), "cache")
    ut = s.finetune_config("unet+text")
    assert dict(ut.strategy.lrs) == pytest.approx({"unet": 1e-4, "text_encoder": 1e-5})


def test_ensure_dataset_reuses_and_regenerates(tmp_path):
    folder = str(tmp_path / "ph")
    a = phantom.ensure_dataset(folder, n_patients=4, resolution=32, seed=1, progress=False)
    marker = os.path.join(folder, phantom.DATASET_MARKER)
    m1 = os.path.getmtime(a["train"])
    b = phantom.ensure_dataset(folder, n_patients=4, resolution=32, seed=1, progress=False)
    assert a == b and os.path.getmtime(b["train"]) == m1  # reused, not rewritten
    c = phantom.ensure_dataset(folder, n_patients=6, resolution=32, seed=1, progress=False)
    assert json.load(open(marker))["n_patients"] == 6
    n = sum(1 for _ in open(c["train"])) + sum(1 for _ in open(c["valid"])) + sum(
        1 for _ in open(c["test"])) - 3
    assert n == 12  # 6 patients x 2 films


@pytest.mark.slow
def test_phantom_labels_are_learnable(tmp_path):
    """The demo's judge (a classifier on 100% of the real phantom training films) reaches
    the issue's macro AUROC >= 0.85 on the patient-disjoint test split, and so it does on
    the images it will judge: the test films at the synthesis resolution stored grey, and
    their reconstructions by the foundation model's VAE, through the route generated images
    take (jaxmed.eval.judge). At the demo's 128 px: at 64 px the VAE's 8x8 latent grid
    erases the pneumothorax's fine signs (reconstruction macro AUROC 0.81, pneumothorax
    0.53, measured 2026-12-05), which is a property of the tiny VAE at that size, not of
    the route."""
    c = load_config("configs/study.py:demo")
    assert c.data.resolution == 128 and c.classifier.image_size == 64
    set_override(c, "log.progress", "False")
    s = study.Study(c, str(tmp_path))
    s.prepare_data()
    s.judge()
    js = s.judge_summary
    assert js["n_train"] >= 800 and js["n"] >= 150
    assert js["macro_auroc"] >= c.classifier.min_macro_auroc == 0.85, js["auroc"]
    assert min(js["auroc"].values()) > 0.65, js["auroc"]  # every condition, not the mean
    # The judge on the images it will judge, through the generated images' route: the
    # films at the synthesis resolution stored grey, and their reconstructions by the
    # foundation model's VAE (jaxmed.eval.judge).
    v = js["views"]
    assert v["color"] == "grey" and v["resolution"] == 128
    assert abs(v["real"]["macro_auroc"] - js["macro_auroc"]) < 1e-9  # one route
    for view in ("synthesis_resolution", "vae_reconstruction"):
        assert v[view]["n"] == js["n"]
        assert v[view]["macro_auroc"] >= 0.85, (view, v[view]["auroc"])
    assert v["ok"]
    # positive control: the reconstructions scored as a generated set by Evaluator
    pc = v["positive_control"]
    assert pc["view"] == "vae_reconstruction" and pc["n"] == js["n"]
    assert pc["interval"][0] > 0.75 and pc["shuffled_interval"][0] < 0.5 < \
        pc["shuffled_interval"][1], pc


def test_even_inception_batch():
    # at most pytorch-fid's 50 per batch, in equal batches: no padded images per model
    assert [study._even_batch(n) for n in (60, 18, 100, 101, 30000)] == [30, 18, 50, 34, 50]
