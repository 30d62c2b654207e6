"""The accelerator preset (``configs/finetune.py:<strategy>,<model>,<topology>``) and the
README's planning table (bench/plan_table.py): the study's batch per optimizer step kept as
per-chip batch x chips x accumulation, and a table that never fills a cell it did not plan."""

import json
import os
import sys

import pytest

from jaxmed import plan_topologies, strategies
from jaxmed.cli import load_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import plan_table  # noqa: E402


@pytest.mark.parametrize("topology", ["v5e-1", "v5e-8", "v4-8", "v5p-8", "v6e-8"])
def test_preset_keeps_the_study_batch_every_strategy(topology):
    topo = plan_topologies.get(topology)
    for name in strategies.names():
        c = load_config(f"configs/finetune.py:{name},sd15,{topology}")
        # docs/STUDY.md: per-GPU batch x 4 GPUs x 4 accumulation steps
        study = strategies.get(name).per_device_batch * 16
        assert c.train.per_device_batch * topo.chips * c.optim.grad_accum == study, name
        assert (c.model.dtype, c.model.remat) == ("bfloat16", True)
        assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, -1, 1)
        assert c.data.resolution == 512


def test_preset_per_chip_batches_and_cpu_defaults_unchanged():
    pick = {n: load_config(f"configs/finetune.py:{n},sd15,v5e-1").train.per_device_batch
            for n in ("unet", "unet+vae+text", "difffit", "lora", "dora", "bitfit")}
    assert pick == {"unet": 1, "unet+vae+text": 1, "difffit": 1, "lora": 4, "dora": 4,
                    "bitfit": 4}
    assert load_config("configs/finetune.py:dora,sd15,v5p-8").train.per_device_batch == 8
    plain = load_config("configs/finetune.py:lora")
    assert (plain.model.dtype, plain.model.remat, plain.train.per_device_batch,
            plain.optim.grad_accum, plain.mesh.fsdp) == ("float32", False, 0, 4, 1)


def test_preset_bad_topology_says_so():
    with pytest.raises(ValueError, match="not an accelerator"):
        load_config("configs/finetune.py:lora,sd15,cpu")
    with pytest.raises(ValueError, match="unknown topology 'v5e-7'"):
        load_config("configs/finetune.py:lora,sd15,v5e-7")


def _row(strategy, topology, result=None, **extra):
    report = {"grad_accum": 8, "result": result} if result else {}
    return {"strategy": strategy, "topology": topology, "rc": 0 if result else None,
            "wall_s": 1.0, "utc": "2026-12-05T00:00:00Z", "cpus": 2, "load_before": 1.0,
            "report": {**report, **extra}}


def test_table_says_what_was_not_planned(tmp_path):
    ok = {"status": "ok", "per_device_batch": 1, "memory_bytes": {"total": 3 * 2**30},
          "flops_per_image": 2.5e12, "lower_s": 15.0, "compile_s": 600.0}
    oom = {"status": "oom", "per_device_batch": 4, "memory_bytes": None,
           "oom": {"required_bytes": 20 * 2**30}}
    path = tmp_path / "results.jsonl"
    fast = {**ok, "memory_bytes": {"total": 4 * 2**30}, "compile_s": 200.0,
            "model_flops_per_image": 3.5e12}
    # A later line with other flags is a variant: listed with its compile time, not tabled;
    # one at compile effort -1 fills a cell only where effort 0 has not been planned.
    variant = {**_row("unet", "v5e-8", fast), "extra": ["--flag"],
               "libtpu_init_args": "--xla_flag=false"}
    quick = [{**_row(s, t, fast), "compile_effort": -1.0}
             for s, t in (("unet", "v5e-8"), ("unet", "v5p-8"))]
    # A --sweep line gives the cell its largest batch; the cell keeps the preset's batch.
    swept = {**_row("unet", "v5p-8", {**fast, "per_device_batch": 6},
                    largest_per_device_batch=6, first_too_large=7),
             "sweep": True, "compile_effort": -1.0}
    rows = [_row("unet", "v5e-8", oom), _row("unet", "v5e-8", ok), variant,  # the latest wins
            *quick, swept, _row("lora", "v5e-1", oom), _row("lora", "v4-8")]  # timed out
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = plan_table.render(str(path))
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
             for line in table.splitlines() if line.startswith("| `")}
    assert list(cells) == ["`unet`", "`lora`"]  # in the registry's order
    v5e1, v5e8, v48, v5p8 = cells["`unet`"]
    assert v5e1 == v48 == "not compiled yet"
    # Model FLOPs where the line has them (newer plans), else XLA's count, said so.
    assert v5e8 == "3.0 GiB at 1/chip x 8 accum, fits; largest >= 1 (not swept); 2.50e+12 " \
        "FLOPs/image (XLA's count)"
    assert v5p8 == "4.0 GiB at 1/chip x 8 accum, fits; largest 6; 3.50e+12 FLOPs/image " \
        "(effort -1)"
    assert cells["`lora`"][0] == "does not fit at 4/chip (needs 20.0+ GiB)"
    assert cells["`lora`"][2] == "plan failed (timed out)"
    assert "Not compiled yet on any topology:" in table and "`dora`" in table
    assert "unet on v5e-8: lowered 15 s, compiled 600 s" in table
    assert ("unet on v5e-8 with --flag LIBTPU_INIT_ARGS=--xla_flag=false: lowered 15 s, "
            "compiled 200 s") in table
    assert "unet on v5e-8 at effort -1: lowered 15 s, compiled 200 s" in table


def test_table_goes_between_the_readme_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{plan_table.BEGIN}\nold\n{plan_table.END}\nrest\n")
    plan_table.put_in_readme("| new |", str(readme))
    assert readme.read_text() == f"intro\n{plan_table.BEGIN}\n| new |\n{plan_table.END}\nrest\n"


def test_libtpu_log_says_where_the_compile_went(tmp_path):
    (tmp_path / "tpu_driver.vm.root.log.INFO.20261205-174528.4242").write_text(
        "I1205 17:47:02.8 4242 deepsea_compiler_hlo_passes.cc:6046] XLA::TPU running hlo "
        "passes for 73,640 instructions, module: jit_step\n"
        "I1205 17:52:30.2 4242 deepsea_compiler_hlo_passes.cc:6241] HLO_PASSES stage "
        "duration: 5m27.43141719525s\n"
        "E1205 18:12:21.4 11929 slow_operation_alarm.cc:73] ************\n"
        "Slow compilation warning:\n fusion.26856\n is taking more than 2 minutes to compile\n")
    assert plan_table.libtpu_log(4242, str(tmp_path)) == {
        "hlo_instructions": 73640, "hlo_passes_s": 327.4, "slow_fusions": ["fusion.26856"]}
    assert plan_table.libtpu_log(4243, str(tmp_path)) == {}
