"""colab/jaxmed_demo.ipynb, executed end to end on CPU in a real IPython kernel (nbclient) with
the ci preset cut to one strategy, and read for what would break in Colab; `jaxmed.api`, the
functions the notebook calls."""

from __future__ import annotations

import ast
import base64
import csv
import glob
import json
import os
import re

import pytest
from PIL import Image

from jaxmed import api
from jaxmed.cli import ConfigError
from jaxmed.eval.tables import FLOOR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "colab", "jaxmed_demo.ipynb")

# The notebook's settings for the run here: the ci preset with one strategy and no base on
# the model tests/test_study.py uses, compiled at conftest's matmul precision (so the kernel
# shares the suite's compiled programs through the persistent cache), section 6
# fine-tuning with the study's own lora settings, 3 sampling steps.
TEST_SETTINGS = """
import os
import jax
jax.config.update("jax_default_matmul_precision", "highest")
PRESET = "ci"
OVERRIDES = {{"model.path": {model!r}, "strategies": ("lora",), "include_base": False,
             "log.progress": False}}
WORKDIR = {wd!r}
SAMPLE_STEPS = 3
FINETUNE = True
_study = os.path.join(WORKDIR, "study-ci")
FINETUNE_OVERRIDES = {{
    "model.path": {model!r}, "data.resolution": 32, "data.phantom_patients": 40,
    "data.phantom_dir": os.path.join(_study, "data"), "cache.dir": os.path.join(_study, "cache"),
    "optim.grad_accum": 1, "train.per_device_batch": 2, "train.max_steps": 3,
    "checkpoint.every_steps": 3, "log.sample_every_steps": -1, "log.progress": False,
    "log.tensorboard": False}}
"""


def read_notebook() -> dict:
    with open(NOTEBOOK) as f:
        return json.load(f)


def code_sources(nb: dict) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def _inside_colab_guard(tree: ast.AST, call: ast.Call) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "IN_COLAB" in ast.unparse(node.test):
            if any(call is n for stmt in node.body for n in ast.walk(stmt)):
                return True
    return False


def test_cells_run_jaxmed_in_the_kernel_and_install_only_in_colab():
    nb = read_notebook()
    sources = code_sources(nb)
    assert sources
    for src in sources:
        # `!python -m jaxmed.train`, `%run -m jaxmed...`, subprocess([..., "-m", "jaxmed.x"]):
        # a second process gets no TPU and little GPU memory (the kernel holds them).
        assert not re.search(r"-m[\s'\",]+jaxmed", src), src
        assert not re.search(r"^\s*[!%]", src, re.M), f"shell / magic line in:\n{src}"
        tree = ast.parse(src)  # plain Python: no IPython syntax left to hide a command in
        in_defs = {id(n) for d in ast.walk(tree) if isinstance(d, ast.FunctionDef)
                   for n in ast.walk(d)}  # a definition runs nothing; its calls are checked
        for call in (n for n in ast.walk(tree)
                     if isinstance(n, ast.Call) and id(n) not in in_defs):
            name = ast.unparse(call.func)
            if name in ("pip", "subprocess.run", "subprocess.check_call", "os.system"):
                assert _inside_colab_guard(tree, call), f"{name} outside `if IN_COLAB`: {src}"
    text = "\n".join(sources)
    for needed in ("api.study(", "api.sample(", "api.train(", "api.setup(",
                   "weights.resolve_model_path(weights.SD15_HUB_ID)", "jax[tpu]",
                   "/dev/vfio/", "drive.mount("):
        assert needed in text, needed
    assert "runwayml" not in json.dumps(nb)
    tagged = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1


def test_notebook_executes_on_cpu(tiny_sd_folder, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="the test extra: pip install -e '.[test]'")
    nbformat = pytest.importorskip("nbformat", reason="the test extra")
    pytest.importorskip("ipykernel", reason="the test extra")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    wd = str(tmp_path / "runs")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    settings = TEST_SETTINGS.format(wd=wd, model=tiny_sd_folder)
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(settings))
    nb.cells.append(nbformat.v4.new_code_cell(
        "import jax, jaxmed.hostmem\n"
        "print('PROBE', jax.devices()[0].platform, jaxmed.hostmem._applied)"))
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on failure

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    stdout = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    # in the kernel, on the CPU, with the command-line tools' malloc setting left alone
    assert "PROBE cpu None" in stdout

    study = os.path.join(wd, "study-ci")
    with open(os.path.join(study, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["lora", FLOOR]
    assert rows[0]["n_generated"] == "18" and int(rows[0]["trainable_params"]) > 0
    assert float(rows[0]["fid_domain"]) >= 0 and 0 <= float(rows[0]["align_auroc"]) <= 1
    md = open(os.path.join(study, "results.md")).read()
    assert "## The study's three findings" in md

    # what the results cell showed inline: the table, results.md, the plots and samples_all
    shown = [o for o in outputs if o.output_type == "display_data"]
    html = [o.data["text/html"] for o in shown if "text/html" in o.data]
    assert any("lora" in h and "fid_domain" in h for h in html)
    assert any("three findings" in o.data.get("text/markdown", "") for o in shown)
    pngs = [base64.b64decode(o.data["image/png"]) for o in shown if "image/png" in o.data]
    plots = sorted(glob.glob(os.path.join(study, "*.png")))
    assert {"fid_vs_params.png", "auroc_vs_fraction.png", "samples_all.png"} <= {
        os.path.basename(p) for p in plots}
    grids = [os.path.join(study, "lora", "my_prompts.png"),
             os.path.join(wd, "finetune-lora", "my_prompts.png")]
    for path in plots + grids:  # each file displayed, byte for byte
        with open(path, "rb") as f:
            assert f.read() in pngs, path
    assert len(pngs) == len(plots) + len(grids)
    for path in grids:  # 3 prompts x 2 images of 32 px, a row per prompt
        with Image.open(path) as im:
            assert im.width >= 2 * 32 and im.height >= 3 * 32, im.size

    # section 6: api.train on the study's lora settings reproduces the study's lora run
    with open(os.path.join(wd, "finetune-lora", "summary.json")) as f:
        mine = json.load(f)
    with open(os.path.join(study, "lora", "train", "summary.json")) as f:
        theirs = json.load(f)
    assert mine["steps"] == theirs["steps"] == 3
    assert mine["final_loss"] == theirs["final_loss"]
    assert os.path.isfile(os.path.join(wd, "finetune-lora", "export", "model_index.json"))


def test_api_config_overrides_as_the_command_line_does():
    base = api.config("configs/finetune.py:lora")
    c = api.config(base, {"train.max_steps": 5, "data.csv": "/data/train.csv",
                          "strategy.rank": "16", "data.templates": ["{findings}"]})
    assert (c.train.max_steps, c.data.csv, c.strategy.rank) == (5, "/data/train.csv", 16)
    assert c.data.templates == ("{findings}",)
    assert base.train.max_steps == -1 and base.strategy.rank == 8  # the input is not changed
    listed = api.config("configs/finetune.py:lora",
                        ["train.max_steps=5", "--config.optim.clip_norm=0.5"])
    assert (listed.train.max_steps, listed.optim.clip_norm) == (5, 0.5)
    with pytest.raises(ConfigError, match="did you mean config.train.max_steps"):
        api.config(base, {"train.max_step": 3})
    with pytest.raises(ConfigError, match="expected int"):
        api.config(base, {"train.max_steps": "many"})
    with pytest.raises(ConfigError, match="'a.b=value'"):
        api.config(base, ["train.max_steps"])
    with pytest.raises(ValueError, match="prompts=.*or combinations"):
        api.sample("jaxmed:tiny-sd", "out.png")
