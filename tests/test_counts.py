"""`python -m jaxmed.counts`: SD 1.5 counts without weights, as a table and as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxmed import counts, strategies
from jaxmed.models import tiny, weights
from tests.helpers import ROOT


def _main(capsys, *argv):
    rc = counts.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_lora_table_on_sd15(capsys):
    rc, out, _ = _main(capsys, "--config", "configs/finetune.py:lora", "--config.model.arch=sd15")
    assert rc == 0, out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    for word in ("unet", "vae", "text_encoder", "total"):
        assert word in lines
    assert "859,520,964" in lines["unet"] and "1,594,368" in lines["unet"]
    assert "0.1855%" in lines["unet"]
    assert "83,653,863" in lines["vae"] and "123,060,480" in lines["text_encoder"]
    assert "1,066,235,307" in lines["total"] and "1,594,368" in lines["total"]
    assert f"{8 * 1_594_368 + 4:,} B" in lines["unet"]  # AdamW moments + step count


@pytest.mark.parametrize("argv,want", [
    (["configs/finetune.py:lora", "--config.strategy.rank=4"], {"unet": 797_184}),
    (["configs/finetune.py:dora"], {"unet": 1_694_208}),
    (["configs/finetune.py:bitfit"], {"unet": 343_684}),
    (["configs/finetune.py:unet+vae+text"], {"unet": 859_520_964, "vae": 83_653_863,
                                             "text_encoder": 123_060_480}),
])
def test_json(capsys, argv, want):
    rc, out, _ = _main(capsys, "--config", *argv, "--config.model.arch", "sd15", "--json")
    assert rc == 0
    rep = json.loads(out)
    got = {c: r["trainable"] for c, r in rep["components"].items() if r["trainable"]}
    assert got == want
    assert rep["total"]["total"] == 1_066_235_307
    assert rep["total"]["optimizer_state_bytes"] == 8 * sum(want.values()) + 4 * len(want)


def test_cli_subprocess_and_sd15_preset():
    """As a module, with the sd15 preset of the config (hub id, no download: built-in arch)."""
    r = subprocess.run(
        [sys.executable, "-m", "jaxmed.counts", "--config", "configs/finetune.py:difffit,sd15",
         "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["components"]["unet"]["trainable"] == 859_077_120
    assert rep["model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_model_path_reads_configs_only(capsys, tmp_path):
    """arch "" reads the three config.json files of a diffusers folder; no weights needed."""
    cfgs = tiny.configs("test")
    for name, cfg in cfgs.items():
        spec = weights.COMPONENTS[name]
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / spec.config_name, "w") as f:
            json.dump(cfg.to_dict(), f)
    rc, out, err = _main(capsys, "--config", "configs/finetune.py:lora",
                         f"--config.model.path={tmp_path}", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    params = counts.abstract_params(cfgs)
    assert rep["components"]["unet"]["total"] == strategies.count(params["unet"])
    assert 0 < rep["components"]["unet"]["trainable"] < rep["components"]["unet"]["total"]


def test_list_and_errors(capsys, tmp_path):
    rc, out, _ = _main(capsys, "--list")
    assert rc == 0
    for name in strategies.names():
        assert f"\n{name} " in "\n" + out
    rc, _, err = _main(capsys, "--config", "configs/finetune.py:nope", "--config.model.arch=sd15")
    assert rc == 2 and "valid names" in err and "difffit-orig" in err
    rc, _, err = _main(capsys, "--config", "configs/finetune.py:lora", "--config.model.arch=sd3")
    assert rc == 2 and "sd15" in err
    rc, _, err = _main(capsys, "--config", "configs/finetune.py:lora",
                       "--config.strategy.targets=('to_x',)", "--config.model.arch=sd15")
    assert rc == 2 and "to_x" in err and "down_blocks.0.attentions.0.proj_in" in err
    rc, _, err = _main(capsys, "--config", "configs/finetune.py:lora",
                       f"--config.model.path={tmp_path / 'missing'}")
    assert rc == 2 and "model.arch" in err


def test_arch_field_when_the_config_has_it(capsys, tmp_path):
    """Once configs/finetune.py defines model.arch, the override goes through the config."""
    path = tmp_path / "with_arch.py"
    finetune = os.path.join(ROOT, "configs", "finetune.py")
    path.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('ft', {finetune!r})\n"
        "ft = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(ft)\n\n\n"
        "def get_config(arg=None):\n"
        "    c = ft.get_config(arg)\n"
        "    c.model.arch = ''\n"
        "    return c\n")
    rc, out, err = _main(capsys, "--config", f"{path}:lora", "--config.model.arch=sd15", "--json")
    assert rc == 0, err
    assert json.loads(out)["components"]["unet"]["trainable"] == 1_594_368
