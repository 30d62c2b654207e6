"""jaxmed.plan: the training step compiled for a TPU topology without a TPU (libtpu's
deviceless compile) or for this CPU, with memory and FLOPs read from the compiled program.
Tiny architectures only (random:test at 32 px, one micro-batch of one image per chip)."""

import importlib.util
import json
import sys

import pytest

from jaxmed import plan, plan_topologies
from jaxmed.cli import load_config, set_override

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed, so no TPU topology can be compiled for "
    "(pip install 'jaxmed[tpu-plan]')")

CPU_KERNEL_SWITCHES = ("JAXMED_CPU_ATTENTION", "JAXMED_CPU_CONV", "JAXMED_CPU_DENSE",
                       "JAXMED_CPU_ADAMW")
TINY = {"model.path": "random:test@32", "data.resolution": "32", "optim.grad_accum": "1",
        "train.per_device_batch": "1"}


def tiny_config(strategy: str = "unet", **overrides):
    config = load_config(f"configs/finetune.py:{strategy}")
    for key, value in {**TINY, **overrides}.items():
        set_override(config, key, value)
    return config


def tiny_argv(strategy: str = "unet", **overrides) -> list[str]:
    return ["--config", f"configs/finetune.py:{strategy}",
            *(f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items())]


def check_numbers(result: dict) -> None:
    """Memory and FLOPs present and plausible for a step that compiled."""
    assert result["status"] == "ok", result.get("message")
    mem = result["memory_bytes"]
    assert mem["arguments"] > 0 and mem["temporaries"] > 0 and mem["outputs"] > 0
    # The donated state comes back as the new state, in the same buffers.
    assert 0 < mem["aliased"] <= min(mem["arguments"], mem["outputs"])
    assert mem["arguments"] < mem["total"] <= result["capacity_bytes"]
    assert result["flops_per_chip"] > 0 and result["flops_per_image"] > 0
    assert result["model_flops_per_image"] * result["images"] == pytest.approx(
        result["model_flops_per_step"]) and result["model_flops_per_step"] > 0
    assert result["lower_s"] > 0 and result["compile_s"] > 0


@pytest.mark.slow
@needs_libtpu
def test_tiny_unet_step_compiles_for_tpu_with_cpu_kernels_on():
    """Also at train.compile_effort=-1, which reaches libtpu: another program comes out (for
    this one a little more code; for SD 1.5 a quarter of the code: README, "Compile time")."""
    mem = {}
    for effort in (0.0, -1.0):
        report = plan.run(tiny_config(**{"train.compile_effort": str(effort)}), "v5e-8",
                          quiet=True)
        assert report["compile_effort"] == effort
        check_numbers(report["result"])
        mem[effort] = report["result"]["memory_bytes"]
    assert mem[-1.0] != mem[0.0], mem


def test_compile_effort_out_of_range_one_clear_error(capsys):
    assert plan.main([*tiny_argv(**{"train.compile_effort": "2"}), "--topology", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: train.compile_effort=2.0: must lie in [-1, 1]"], err


@pytest.mark.slow
@needs_libtpu
def test_tiny_unet_step_for_tpu_v5e_memory_flops_ideal_time(monkeypatch, tmp_path):
    for switch in CPU_KERNEL_SWITCHES:  # until kernels are chosen by the lowering platform
        monkeypatch.setenv(switch, "0")
    out = tmp_path / "plan.json"
    report = plan.run(tiny_config(**{"mesh.data": "1", "mesh.fsdp": "4"}), "v5e-4",
                      json_path=str(out), quiet=True)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert (report["chips"], report["chip"], report["peak_tflops_per_chip"]) == (
        4, "TPU v5e", 197.0)
    result = report["result"]
    check_numbers(result)
    assert result["capacity_bytes"] == 16 * 2**30
    assert result["images"] == 4
    assert result["ideal_step_s"] == pytest.approx(
        result["model_flops_per_step"] / 4 / 197e12, rel=1e-6)
    text = plan.format_result(result, plan_topologies.get("v5e-4"), 4)
    assert "TFLOP/s bf16 peak" in text and "fits" in text


@needs_libtpu
def test_too_large_for_tpu_says_what_to_turn(capsys, tmp_path, monkeypatch):
    for switch in CPU_KERNEL_SWITCHES:
        monkeypatch.setenv(switch, "0")
    out = tmp_path / "oom.json"
    argv = tiny_argv(**{"train.per_device_batch": "32768"})
    assert plan.main([*argv, "--topology", "v5e-1", "--json", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "DOES NOT FIT" in printed and "--config.model.remat=True" in printed
    report = json.loads(out.read_text())
    oom = report["result"]["oom"]
    assert report["result"]["status"] == "oom" and oom["what"] == "HLO temporaries"
    assert oom["required_bytes"] > oom["available_bytes"] > 15 * 2**30
    assert report["knobs"][0].startswith("--config.train.per_device_batch=N (now 32768")


def test_cpu_topology_then_sweep(capsys, tmp_path):
    out = tmp_path / "cpu.json"
    assert plan.main([*tiny_argv(), "--topology", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lowering" in printed and "compiling" in printed and "fits" in printed
    report = json.loads(out.read_text())
    assert report["topology"] == "cpu" and report["chip"] == "CPU host"
    check_numbers(report["result"])
    assert "ideal_step_s" not in report["result"]  # no peak for a CPU

    out = tmp_path / "sweep.json"
    assert plan.main([*tiny_argv(), "--topology", "cpu", "--sweep", "--sweep-max", "2",
                      "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["largest_per_device_batch"] == 2
    assert [t["per_device_batch"] for t in report["trials"]] == [1, 2]
    a, b = (t["memory_bytes"]["temporaries"] for t in report["trials"])
    assert b > a  # twice the images, more activations


def test_sweep_doubles_then_bisects(monkeypatch):
    """Fits up to 5 per chip: tries 1, 2, 4, 8 (too large), then 6, 5."""
    tried = []

    def fake_compile(step, topo, n_chips, quiet=False):
        b = step.per_device_batch
        tried.append(b)
        return {"per_device_batch": b, "status": "ok" if b <= 5 else "oom",
                "memory_bytes": None, "capacity_bytes": 1}

    monkeypatch.setattr(plan, "make_step", lambda config, *a, **k: plan.Step(
        None, (), config.train.per_device_batch, 1, 1, config.train.per_device_batch, {},
        None))
    res = plan.sweep(tiny_config(), plan_topologies.get("cpu"), [None], compile_fn=fake_compile,
                     quiet=True)
    assert tried == [1, 2, 4, 8, 6, 5]
    assert (res["largest_per_device_batch"], res["first_too_large"]) == (5, 6)


def test_sample_call_for_cpu(tmp_path):
    out = tmp_path / "sample.json"
    assert plan.main([*tiny_argv(), "--topology", "cpu", "--what", "sample",
                      "--sample-steps", "2", "--quiet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["result"]
    assert result["what"] == "sample" and result["flops_per_chip"] > 0
    assert "denoising loop" in result["flops_note"]
    mem = result["memory_bytes"]
    assert mem["arguments"] > 0 and mem["aliased"] == 0


def test_knobs_name_config_keys():
    config = tiny_config()
    result = {"per_device_batch": 4, "memory_bytes": {"arguments": 10, "temporaries": 20}}
    keys = "\n".join(plan.knobs(config, result, 8))
    for key in ("--config.train.per_device_batch", "--config.optim.grad_accum",
                "--config.model.remat=True", "--config.model.dtype=bfloat16",
                "--config.mesh.fsdp=8"):
        assert key in keys
    set_override(config, "model.remat", "True")
    assert "remat" not in "\n".join(plan.knobs(config, result, 8))


def test_without_libtpu_one_line_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu now raises ImportError
    assert plan.main([*tiny_argv(), "--topology", "v5e-8"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "pip install 'jaxmed[tpu-plan]'" in err[0], captured.err
    assert "lowering" not in captured.out


def test_bad_topology_one_clear_error(capsys):
    assert plan.main([*tiny_argv(), "--topology", "v5e-7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown topology 'v5e-7'" in err[0] and "v5e-8" in err[0]


def test_topology_table():
    for name in ("v5e-1", "v5e-4", "v5e-8", "v4-8", "v5p-8", "v6e-8", "cpu"):
        assert plan_topologies.get(name).name == name
    peaks = {n: (t.chip.peak_tflops, t.chip.hbm_gib) for n, t in
             plan_topologies.TOPOLOGIES.items() if t.chip}
    assert peaks["v5e-8"] == (197.0, 16.0) and peaks["v4-8"] == (275.0, 32.0)
    assert peaks["v5p-8"] == (459.0, 95.0) and peaks["v6e-8"] == (918.0, 32.0)
    # v4-8 and v5p-8 count TensorCores: 4 chips of 2 cores each.
    assert plan_topologies.get("v4-8").chips == plan_topologies.get("v5p-8").chips == 4


@needs_libtpu
def test_topology_devices():
    for name, n, kind in (("v5e-8", 8, "TPU v5 lite"), ("v4-8", 4, "TPU v4"),
                          ("v6e-1", 1, "TPU v6 lite")):
        devs = plan_topologies.devices(plan_topologies.get(name))
        assert len(devs) == n and devs[0].device_kind == kind
