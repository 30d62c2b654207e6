"""The training loop: sharded == single device, resume after SIGKILL is bitwise exact, every
strategy over-fits, and bad input stops with a message that names the problem."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed import losses, strategies, train
from jaxmed.checkpoint import Checkpointer
from jaxmed.cli import ConfigError, load_config, set_override
from jaxmed.data import Batches
from jaxmed.logging_utils import LineBar, progress
from jaxmed.strategies.base import flatten
from tests.helpers import write_chexpert_dataset
from tests.train_worker import config as make_config

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "train_worker.py")


def _worker(*args, env=None, **kw):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, WORKER, *map(str, args)], env=env,
                          capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def overfit_csv(tmp_path_factory):
    # 4 images: one optimizer step (2 per device x accum 2) sees all of them.
    return write_chexpert_dataset(str(tmp_path_factory.mktemp("overfit")), n=4, size=32, seed=1)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One latent / text cache for every strategy, as the study shares it."""
    return str(tmp_path_factory.mktemp("cache"))


def _fixed_loss(trainer: train.Trainer, batch: dict) -> float:
    """Mean loss over 4 fixed (noise, t) draws on a fixed batch: comparable across steps."""
    sd, strat = trainer.sd, trainer.strategy
    pred_type = sd.prediction_type

    @jax.jit
    def f(trainable, frozen, batch):
        values = [losses.diffusion_loss(sd, strat, trainable, frozen, batch,
                                        jax.random.PRNGKey(100 + i), prediction_type=pred_type)[0]
                  for i in range(4)]
        return jnp.mean(jnp.stack(values))

    return float(f(trainer.state.trainable, trainer.frozen, batch))


HIGH_LR = {"bitfit": 3e-2, "difffit-orig": 3e-2, "svdiff": 3e-2, "lora": 1e-2, "dora": 1e-2,
           "text": 3e-3, "attn": 3e-3}


@pytest.mark.slow
@pytest.mark.parametrize("name", strategies.names())
def test_loss_falls_when_overfitting(name, tiny_sd_folder, overfit_csv, shared_cache, tmp_path):
    lr = HIGH_LR.get(name, 1e-3)
    over = {"train.max_steps": 6, "data.caption_dropout": 0.0, "optim.grad_accum": 2,
            "train.per_device_batch": 2, "checkpoint.every_steps": 100,
            "cache.dir": shared_cache}
    c = make_config(name, tiny_sd_folder, overfit_csv, **over)
    if "lrs" in c.strategy:
        for comp in c.strategy.lrs:
            c.strategy.lrs[comp] = lr
    else:
        c.strategy.lr = lr
    trainer = train.Trainer(c, str(tmp_path))
    raw = Batches(trainer.records, 4, tokenizer=trainer.sd.tokenizer, resolution=32,
                  shuffle=False).batch_at(0, 0)
    batch = {"image": jnp.asarray(raw["image"]), "input_ids": jnp.asarray(raw["input_ids"])}
    before = _fixed_loss(trainer, batch)
    trainer.run()
    after = _fixed_loss(trainer, batch)
    assert np.isfinite(after)
    # The fixed-batch loss is deterministic, so a 2% drop is signal, not noise. (Training the
    # text encoder alone under a frozen random UNet can only move it ~4%.)
    assert after < 0.98 * before, f"{name}: fixed-batch loss {before:.4f} -> {after:.4f}"


@pytest.mark.slow
def test_sharded_equals_single_device(tiny_sd_folder, tiny_dataset, tmp_path):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    for name in ("unet", "lora"):
        out = str(tmp_path / f"{name}.npz")
        r = _worker("sharded", name, tiny_sd_folder, tiny_dataset, out,
                    "data.caption_dropout=0.0", env=env)
        assert r.returncode == 0, r.stderr[-4000:]
        res = np.load(out)
        singles = [k for k in res.files if k.startswith("single/params/")]
        assert singles
        worst = 0.0
        for k in singles:
            a, b = res[k], res[k.replace("single/", "sharded/", 1)]
            worst = max(worst, float(np.max(np.abs(a - b))))
        assert worst <= 1e-5, f"{name}: params differ by {worst}"
        assert abs(float(res["single/loss"]) - float(res["sharded/loss"])) <= 1e-5
        # Parameters really are sharded: the frozen UNet weights over fsdp (lora) or the
        # trainable ones (unet), not replicated copies.
        key = "sharded/n_trainable_sharded" if name == "unet" else "sharded/n_frozen_sharded"
        assert int(res[key]) > 10, f"{name}: only {int(res[key])} leaves sharded over fsdp"
        if name == "unet":  # mu and nu of each sharded weight follow it (not replicated)
            n_opt, n_t = int(res["sharded/n_opt_sharded"]), int(res[key])
            assert n_opt == 2 * n_t, f"{n_opt} moment leaves sharded for {n_t} weights"


def _final_state(workdir: str, step: int) -> dict:
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), "state")
    state = ocp.StandardCheckpointer().restore(os.path.abspath(path))
    return {"/".join(p): np.asarray(v) for p, v in flatten(state["trainable"]).items()}


def test_resume_after_sigkill_is_bitwise_exact(tiny_sd_folder, tiny_dataset, tmp_path):
    args = ("lora", tiny_sd_folder, tiny_dataset)
    over = ["train.max_steps=6", "checkpoint.every_steps=2"]
    ref = str(tmp_path / "ref")
    r = _worker("run", *args, ref, *over)
    assert r.returncode == 0, r.stderr[-4000:]

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, WORKER, "run", *args, killed, *over],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt2 = os.path.join(killed, "checkpoints", "2")
    deadline = time.time() + 600
    while not os.path.isdir(ckpt2) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "summary.json"))
    r = _worker("run", *args, killed, *over)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resuming at step" in r.stdout
    a, b = _final_state(ref, 6), _final_state(killed, 6)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{k} differs after resume"


# ---------------------------------------------------------------------------------------
# Bad input


def test_unknown_config_key_is_an_error(capsys):
    c = load_config(os.path.join(HERE, "..", "configs", "finetune.py") + ":lora")
    with pytest.raises(ConfigError, match="optim has no field 'lr'.*Valid fields"):
        set_override(c, "optim.lr", "1e-3")
    rc = train.main(["--config", "configs/finetune.py:lora", "--config.train.epoch=3",
                     "--workdir", "/tmp/never"])
    assert rc == 2
    assert "did you mean config.train.epochs" in capsys.readouterr().err


def test_url_workdir_it_cannot_reach_is_a_clear_error(capsys):
    # gs:// workdirs are taken (tests/test_storage.py); one the machine cannot reach, or a
    # scheme epath has no storage for, is one line before anything loads.
    args = ["--config", "configs/finetune.py:lora", "--workdir"]
    assert train.main([*args, "ftp://host/run"]) == 2
    assert "ftp:// is not a storage jaxmed can write to" in capsys.readouterr().err
    assert train.main([*args, "/tmp/never", "--config.cache.dir=gs://b/cache"]) == 2
    assert "--config.cache.dir gs://b/cache: this folder must be local" in (
        capsys.readouterr().err)
    if not any(importlib.util.find_spec(m) for m in ("gcsfs", "tensorflow")):
        assert train.main([*args, "gs://bucket/run"]) == 2
        assert "needs the gcsfs package (pip install gcsfs)" in capsys.readouterr().err


@pytest.fixture
def root_logging():
    """The CLI sets the root logger's handler (`cli.setup_logging`); put pytest's back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _user_error(capsys, workdir, *args) -> str:
    """Run `jaxmed.train` in-process; it must exit 2 with one error line, no traceback."""
    rc = train.main(["--config", "configs/finetune.py:lora", "--workdir", str(workdir),
                     *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return err


def test_user_errors_exit_2_with_one_line(tiny_sd_folder, tmp_path, capsys, root_logging):
    wd = tmp_path / "wd"
    err = _user_error(capsys, wd, "--config.train.stepz=3")  # config
    assert "did you mean config.train.max_steps?" in err
    csv = write_chexpert_dataset(str(tmp_path / "data"), n=8, size=32)
    base = [f"--config.model.path={tiny_sd_folder}", "--config.data.kind=chexpert",
            "--config.data.resolution=32", "--config.train.per_device_batch=2",
            "--config.optim.grad_accum=2", "--config.train.max_steps=2",
            "--config.log.progress=False", "--config.log.tensorboard=False",
            "--config.log.sample_every_steps=-1", "--config.export.diffusers=False"]
    missing = str(tmp_path / "none.csv")
    assert "CSV file not found" in _user_error(capsys, wd, *base, f"--config.data.csv={missing}")
    with pytest.raises(FileNotFoundError):  # --debug: the traceback, for a bug report
        train.main(["--config", "configs/finetune.py:lora", "--workdir", str(wd), *base,
                    f"--config.data.csv={missing}", "--debug"])
    err = _user_error(capsys, wd, *base, f"--config.data.csv={csv}",  # bad image root
                      f"--config.data.image_root={tmp_path / 'wrong'}")
    assert "none of the first 8 images exists" in err and "CheXpert-v1.0/ in image_root" in err
    err = _user_error(capsys, wd, *base, f"--config.data.csv={csv}",  # model files missing
                      f"--config.model.path={tmp_path / 'no-model'}")
    assert "no-model" in err


def test_every_image_unreadable_exits_2_saying_so(tiny_sd_folder, tmp_path, capsys,
                                                   root_logging):
    csv = write_chexpert_dataset(str(tmp_path / "data"), n=8, size=32)
    for i in range(8):
        with open(os.path.join(str(tmp_path / "data"), "imgs", f"{i}.png"), "wb") as f:
            f.write(b"not an image")
    err = _user_error(
        capsys, tmp_path / "wd", f"--config.model.path={tiny_sd_folder}",
        "--config.data.kind=chexpert", f"--config.data.csv={csv}",
        "--config.data.on_bad_image=skip", "--config.data.resolution=32",
        "--config.train.per_device_batch=2", "--config.optim.grad_accum=2",
        "--config.train.max_steps=2", "--config.log.progress=False", "--config.cache.text=off",
        "--config.log.tensorboard=False", "--config.log.sample_every_steps=-1")
    assert "every image tried (8" in err and "was unreadable" in err
    assert str(tmp_path / "data") in err
    # warnings in the configured format, a few per file then a count
    assert "WARNING jaxmed.cache: latent cache: skipping bad image" in err
    assert "WARNING:" not in err
    assert err.count("skipping bad image") <= 10


def test_progress_off_a_terminal_is_plain_lines(capsys):
    bar = progress(total=4, desc="train lora")  # stderr is captured: not a terminal
    assert isinstance(bar, LineBar)
    bar.every = 0.0
    for _ in range(4):
        bar.set_postfix(loss="0.1234")
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    # a line per update, none repeated at close
    assert len(lines) == 4 and lines[-1].startswith("train lora: 4/4 step (100%)")
    assert "loss=0.1234" in lines[-1]


def test_csv_missing_label_column_is_named(tiny_sd_folder, tmp_path):
    csv = write_chexpert_dataset(str(tmp_path), n=4)
    with open(csv) as f:
        lines = [line.rstrip("\n").rsplit(",", 1)[0] for line in f]  # drop Support Devices
    with open(csv, "w") as f:
        f.write("\n".join(lines) + "\n")
    c = make_config("lora", tiny_sd_folder, csv)
    with pytest.raises(Exception, match="Support Devices") as e:
        train.Trainer(c, str(tmp_path / "wd"))
    assert csv in str(e.value)


def test_missing_image_is_named(tiny_sd_folder, tmp_path):
    csv = write_chexpert_dataset(str(tmp_path), n=4)
    os.remove(os.path.join(str(tmp_path), "imgs", "2.png"))
    c = make_config("lora", tiny_sd_folder, csv, **{"train.max_steps": 2,
                                                    "train.per_device_batch": 2,
                                                    "optim.grad_accum": 2})
    with pytest.raises(Exception, match=r"imgs/2\.png") as e:
        train.train(c, str(tmp_path / "wd"))
    assert "row 2" in str(e.value)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tiny_sd_folder, tiny_dataset,
                                                                  tmp_path):
    # Two good steps with a sane lr, then resume with an absurd lr: the update overflows.
    wd = str(tmp_path / "wd")
    good = make_config("lora", tiny_sd_folder, tiny_dataset,
                       **{"train.max_steps": 2, "checkpoint.every_steps": 2})
    train.train(good, wd)
    bad = make_config("lora", tiny_sd_folder, tiny_dataset,
                      **{"train.max_steps": 6, "checkpoint.every_steps": 2})
    bad.strategy.lr = 1e38
    with pytest.raises(FloatingPointError, match=r"NaN/inf at step (3|4).*checkpoint is step 2"):
        train.train(bad, wd)
    assert Checkpointer(os.path.join(wd, "checkpoints")).latest_step() == 2
