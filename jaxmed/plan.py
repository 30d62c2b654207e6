r"""Will it fit, and how fast could it be? Compile the real training (or sampling) step for a
TPU slice on a machine without TPUs, and read memory and FLOPs from the compiled program.

    python -m jaxmed.plan --config configs/finetune.py:unet,sd15 --topology v5e-8 \
        [--config.model.dtype=bfloat16 --config.model.remat=True] \
        [--config.mesh.data=1 --config.mesh.fsdp=8] [--config.train.per_device_batch=2] \
        [--sweep] [--what train|sample] [--sample-steps N] [--json out.json]

Nothing is allocated: the parameters are `jax.ShapeDtypeStruct`s (``jax.eval_shape`` of the
model's init), placed by the same sharding rules as `jaxmed.train`, and the step is the
function `jaxmed.train` jits (`jaxmed.train.jit_train_step`: strategy, optimizer, gradient
accumulation, donated state), lowered and compiled for ``--topology`` (``v5e-1``,
``v5e-4``, ``v5e-8``, ``v4-8``, ``v5p-8``, ``v6e-8``, ... or ``cpu``, this machine;
`jaxmed.plan_topologies`). It prints per-chip memory (arguments, outputs, temporaries,
generated code, total against the chip's HBM), FLOPs per chip per step (XLA's cost
analysis), the step time at the chip's bf16 peak, and how long lowering and compiling
took. When the step does not fit, the compiler's message and the config keys that shrink
it. ``--sweep`` finds the largest per-chip batch that fits (doubling, then bisection).
``--what sample`` compiles `jaxmed.diffusion.sampling.make_sample_fn`'s loop instead (the
``config.log.sample_*`` settings, ``--sample-steps`` denoising steps).

A TPU topology needs libtpu (``pip install 'jaxmed[tpu-plan]'``), which only compiles: no
TPU is attached or used (set ``JAX_PLATFORMS=cpu`` on a TPU VM busy training). With
``$JAXMED_COMPILATION_CACHE`` (or ``$JAXMED_CACHE``) set, ``--topology cpu`` plans go to
JAX's persistent compilation cache (a repeated plan then reports the load time as its
compile time); TPU plans do not, since JAX cannot load a deviceless TPU executable back.
Exit status: 0 fits, 1 does not fit (or nothing does, with ``--sweep``), 2 bad input (one
line on stderr), 3 another compile failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from jaxmed import plan_flops, plan_topologies, sharding
from jaxmed.cli import enable_compilation_cache, main_guard, parse
from jaxmed.files import write_json
from jaxmed.plan_step import (
    PlanError,
    Step,
    abstract_model,
    abstract_sample_step,
    abstract_train_step,
)
from jaxmed.plan_topologies import Topology

WHATS = ("train", "sample")


def _say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[jaxmed.plan] {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# Compile and read the program


_OOM = re.compile(r"RESOURCE_EXHAUSTED|exceeds? (?:the )?available|[Oo]ut of memory|"
                  r"Ran out of memory")
_CPU_CALL = re.compile(r"Custom emitter for (\S+) not found|custom.call.*target.*not found",
                       re.I)


# XLA:TPU's "required for HLO temporaries (39.03G) exceeds available HBM (15.75G)"; its G
# is 2**30 bytes.
_NEED = re.compile(r"required for (?P<what>[\w ]+?) \((?P<req>[\d.]+)(?P<ru>[KMGT]?)\) "
                   r"exceeds available \w+ \((?P<avail>[\d.]+)(?P<au>[KMGT]?)\)")


def _parse_bytes(number: str, unit: str) -> int:
    return int(float(number) * 2 ** (10 * " KMGT".index(unit or " ")))


def _bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _unit(what: str) -> str:
    return "step" if what == "train" else "call"


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def _first_line(err: BaseException, pattern: re.Pattern) -> str:
    text = str(err)
    for line in text.splitlines():
        if pattern.search(line):
            return line.strip()
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def compile_step(step: Step, topo: Topology, n_chips: int, *, quiet: bool = False) -> dict:
    """Lower and compile ``step``; a dict of what the compiled program needs per chip.
    ``status``: ``ok`` | ``oom`` (does not fit: the compiler said so, or the total exceeds
    the chip's memory) | ``error`` (another compile failure, with its message)."""
    out: dict[str, Any] = {"what": step.what, "per_device_batch": step.per_device_batch,
                           "images": step.images, "capacity_bytes": topo.capacity_bytes}
    _say(f"lowering (per-chip batch {step.per_device_batch}, {step.images} images a "
         f"{_unit(step.what)})...", quiet)
    t0 = time.perf_counter()
    # Traced as jaxmed.train and jaxmed.sample run it: with the activation constraints.
    with sharding.activation_sharding(step.mesh):
        traced = step.jitted.trace(*step.args)
        lowered = traced.lower()
    out["lower_s"] = round(time.perf_counter() - t0, 2)
    _say(f"compiling for {topo.name} ({n_chips} x {topo.chip_name})... "
         f"[lowered in {out['lower_s']:.1f} s]", quiet)
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as err:  # noqa: BLE001 - XLA raises one runtime error type for all
        out["compile_s"] = round(time.perf_counter() - t0, 2)
        text = str(err)
        # The compiler's whole message (for an OOM: the largest buffers) goes to the JSON.
        out["detail"] = text[:20000]
        if _OOM.search(text):
            out.update(status="oom", message=_first_line(err, _OOM))
            need = _NEED.search(text)
            if need:
                out["oom"] = {"what": need["what"],
                              "required_bytes": _parse_bytes(need["req"], need["ru"]),
                              "available_bytes": _parse_bytes(need["avail"], need["au"])}
        else:
            out.update(status="error", message=_first_line(err, _CPU_CALL))
            if _CPU_CALL.search(text):
                out["hint"] = ("a CPU-only custom call (one of jaxmed's CPU kernels) reached "
                               "a compile for another platform; JAXMED_CPU_ATTENTION=0 "
                               "JAXMED_CPU_CONV=0 JAXMED_CPU_DENSE=0 JAXMED_CPU_ADAMW=0 "
                               "turns them off")
        return out
    out["compile_s"] = round(time.perf_counter() - t0, 2)
    out["memory_bytes"] = _memory(compiled)
    _flops(out, compiled, _top_scans(traced.jaxpr), step, topo, n_chips)
    _model_flops(out, traced, step, topo, n_chips)
    cap = topo.capacity_bytes
    m = out["memory_bytes"]
    fits = m is None or m["total"] <= cap
    out["status"] = "ok" if fits else "oom"
    if not fits:
        out["message"] = (f"needs {_bytes(m['total'])} per chip, more than the "
                          f"{_bytes(cap)} of a {topo.chip_name}")
    return out


def _memory(compiled) -> dict | None:
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    fields = {"arguments": "argument_size_in_bytes", "outputs": "output_size_in_bytes",
              "aliased": "alias_size_in_bytes", "temporaries": "temp_size_in_bytes",
              "generated_code": "generated_code_size_in_bytes"}
    m = {k: int(getattr(mem, a, 0) or 0) for k, a in fields.items()}
    # Donated state is aliased to the new state: counted once.
    m["total"] = (m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]
                  + m["generated_code"])
    return m


def _top_scans(jaxpr) -> list[int]:
    """Lengths of the loops at the top level of a step (gradient accumulation, the
    denoising loop); loops inside the model are not looked for."""
    return [int(e.params["length"]) for e in jaxpr.eqns if e.primitive.name == "scan"]


def _flops(out: dict, compiled, scans: list[int], step: Step, topo: Topology,
           n_chips: int) -> None:
    """FLOPs per chip as XLA counts them, and per image. XLA's cost analysis counts a loop
    body once, whatever its trip count: with gradient accumulation as a lax.scan the count
    is one micro-batch (plus the optimizer update), so per image it is divided by the
    micro-batch; a sampling call counts one denoising step."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    cost = dict(cost or {})
    flops = float(cost.get("flops", 0.0)) or None
    out["flops_per_chip"] = flops
    out["bytes_accessed_per_chip"] = float(cost.get("bytes accessed", 0.0)) or None
    if not flops:
        return
    images = step.images
    if step.accum > 1 and step.accum in scans:
        images //= step.accum
        out["flops_note"] = ("gradient accumulation is a loop, whose body XLA counts once: "
                             "per chip per micro-batch; per image from one micro-batch")
    elif step.what == "sample" and scans:
        out["flops_note"] = (f"XLA counts the {max(scans)}-iteration denoising loop's body "
                             "once: text encoder + one denoising step + VAE decoder")
    out["flops_per_image"] = flops * n_chips / images


def _model_flops(out: dict, traced, step: Step, topo: Topology, n_chips: int) -> None:
    """Matrix-product and convolution FLOPs counted from the step's jaxpr (`plan_flops`):
    per image of a whole step, and the step time they would take at the chips' peak (the
    ideal step time, replacing XLA's, which misses work on fsdp slices)."""
    counted = plan_flops.count(traced.jaxpr)
    out["model_flops_per_step"] = counted["flops"]
    out["model_flops_per_image"] = counted["flops"] / step.images
    if topo.peak_flops:
        out["ideal_step_s"] = counted["flops"] / n_chips / topo.peak_flops


def knobs(config: ml_collections.ConfigDict, result: dict, n_chips: int) -> list[str]:
    """The config keys that shrink a step that does not fit, the likeliest first."""
    m = config.model
    out = [f"--config.train.per_device_batch=N (now {result['per_device_batch']}; --sweep "
           "finds the largest that fits) with --config.optim.grad_accum=K to keep the "
           f"study's batch (now {config.optim.grad_accum})"]
    if not m.remat:
        out.append("--config.model.remat=True (recompute blocks in the backward pass: far "
                   "fewer activations kept)")
    if m.dtype == "float32":
        out.append("--config.model.dtype=bfloat16 (bf16 compute, params stay float32)")
    if config.mesh.fsdp < n_chips and n_chips > 1:
        out.append(f"--config.mesh.data=1 --config.mesh.fsdp={n_chips} (now data="
                   f"{config.mesh.data} fsdp={config.mesh.fsdp}: shard params, gradients and "
                   "optimizer state over the chips instead of replicating them)")
    mem = result.get("memory_bytes") or {}
    state_heavy = ("argument" in (result.get("oom") or {}).get("what", "")
                   or mem.get("arguments", 0) > mem.get("temporaries", 0))
    if state_heavy and config.mesh.fsdp < n_chips and n_chips > 1:
        out.insert(0, out.pop())  # the state dominates: sharding it helps most
    return out


def format_result(result: dict, topo: Topology, n_chips: int) -> str:
    cap = result.get("capacity_bytes", topo.capacity_bytes)
    unit = _unit(result.get("what", "train"))
    lines = [f"{topo.name}: {n_chips} x {topo.chip_name}, per-chip batch "
             f"{result['per_device_batch']}, {result['images']} images a {unit}"]
    mem = result.get("memory_bytes")
    if mem:
        of = f"{_bytes(cap)} HBM" if topo.chip else f"{_bytes(cap)} host RAM"
        lines += [f"  memory per chip: arguments {_bytes(mem['arguments'])}, outputs "
                  f"{_bytes(mem['outputs'])} ({_bytes(mem['aliased'])} of them aliased to "
                  f"donated arguments), temporaries {_bytes(mem['temporaries'])}, generated "
                  f"code {_bytes(mem['generated_code'])}",
                  f"  total {_bytes(mem['total'])} of {of} ({100 * mem['total'] / cap:.0f}%)"]
    model = result.get("model_flops_per_image")
    if model:
        line = (f"  model FLOPs (matrix products and convolutions, counted from the jaxpr) "
                f"{model:.3e} per image")
        ideal = result.get("ideal_step_s")
        if ideal:
            line += (f"; at the {topo.chip.peak_tflops:g} TFLOP/s bf16 peak "
                     f"{_seconds(ideal)} a {unit} ({result['images'] / ideal:,.1f} images/s)")
        lines.append(line)
    fl = result.get("flops_per_chip")
    if fl:
        lines.append(f"  FLOPs per chip per {unit} {fl:.3e} as XLA counts them, "
                     f"{result['flops_per_image']:.3e} per image"
                     + (f" ({result['flops_note']})" if result.get("flops_note") else ""))
    lines.append((f"  abstract state built in {result['build_s']:.1f} s, "
                  if "build_s" in result else "  ")
                 + f"lowered in {result['lower_s']:.1f} s, compiled in "
                 f"{result['compile_s']:.1f} s")
    status = result["status"]
    lines.append("  fits" if status == "ok" else f"  DOES NOT FIT: {result.get('message')}"
                 if status == "oom" else f"  COMPILE FAILED: {result.get('message')}")
    if result.get("oom"):
        o = result["oom"]
        lines.append(f"  ({o['what']}: {_bytes(o['required_bytes'])} needed, "
                     f"{_bytes(o['available_bytes'])} available per chip)")
    if result.get("hint"):
        lines.append(f"  hint: {result['hint']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Building for a config, and the sweep


def with_batch(config: ml_collections.ConfigDict, per_device: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(config.to_dict())
    c.train.per_device_batch = int(per_device)
    c.lock()
    return c


def make_step(config, topo: Topology, devs, *, what: str = "train",
              sample_steps: int | None = None) -> Step:
    if what not in WHATS:
        raise PlanError(f"--what {what!r}: choose one of {', '.join(WHATS)}")
    sd = abstract_model(config)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                              devices=devs)
    if what == "sample":
        return abstract_sample_step(config, sd, mesh, sample_steps or config.log.sample_steps)
    return abstract_train_step(config, sd, mesh)


def sweep(config, topo: Topology, devs, *, what: str = "train",
          sample_steps: int | None = None, limit: int = 1024, quiet: bool = False,
          compile_fn: Callable[..., dict] | None = None) -> dict:
    """The largest per-chip batch that fits: 1, 2, 4, ... until one does not, then
    bisection between the last that fit and the first that did not."""
    compile_fn = compile_fn or compile_step
    trials: dict[int, dict] = {}

    def fits(b: int) -> bool:
        t0 = time.perf_counter()
        step = make_step(with_batch(config, b), topo, devs, what=what,
                         sample_steps=sample_steps)
        build_s = round(time.perf_counter() - t0, 2)
        r = {**compile_fn(step, topo, len(devs), quiet=quiet), "build_s": build_s}
        trials[b] = r
        if r["status"] == "error":
            raise PlanError(f"per-chip batch {b}: compile failed: {r['message']}"
                            + (f" ({r['hint']})" if r.get("hint") else ""))
        mem = r.get("memory_bytes") or {}
        _say(f"per-chip batch {b}: " + ("fits" if r["status"] == "ok" else "does not fit")
             + (f" ({_bytes(mem['total'])} of {_bytes(r['capacity_bytes'])})" if mem else ""),
             quiet)
        return r["status"] == "ok"

    good, bad = 0, None
    b = 1
    while b <= limit:
        if fits(b):
            good, b = b, b * 2
        else:
            bad = b
            break
    if bad is not None:
        while bad - good > 1:
            mid = (good + bad) // 2
            if fits(mid):
                good = mid
            else:
                bad = mid
    return {"largest_per_device_batch": good or None, "first_too_large": bad,
            "trials": [trials[k] for k in sorted(trials)]}


# ---------------------------------------------------------------------------------------
# Command line


@contextlib.contextmanager
def _persistent_cache(on: bool):
    """JAX's persistent cache writes a deviceless TPU executable but cannot read it back
    ("PjRtCompiler must be constructed with a Client to call DeserializeLoadedExecutable":
    a warning, then a compile anyway), so it is off while compiling for a TPU topology."""
    old = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", bool(on and old))
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", old)


def run(config: ml_collections.ConfigDict, topology: str, *, what: str = "train",
        do_sweep: bool = False, sweep_max: int = 1024, sample_steps: int | None = None,
        json_path: str | None = None, quiet: bool = False) -> dict:
    """Plan ``config`` on ``topology``; the report `--json` writes (also returned)."""
    topo = plan_topologies.get(topology)
    with _persistent_cache(topo.platform != "tpu"):
        return _run(config, topo, what=what, do_sweep=do_sweep, sweep_max=sweep_max,
                    sample_steps=sample_steps, json_path=json_path, quiet=quiet)


def _run(config, topo: Topology, *, what, do_sweep, sweep_max, sample_steps, json_path,
         quiet) -> dict:
    devs = plan_topologies.devices(topo)
    m = config.model
    effort = float(config.train.get("compile_effort", 0.0))
    _say(f"{what} step of {config.strategy.name} ({m.get('arch') or m.path}, "
         f"{config.data.resolution} px, {m.dtype}, remat={m.remat}, attention="
         f"{m.get('attention', 'auto')}, compile effort {effort:g}, mesh data="
         f"{config.mesh.data} fsdp={config.mesh.fsdp} tensor={config.mesh.tensor}) for "
         f"{topo.name}", quiet)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "topology": topo.name,
        "chip": topo.chip_name, "chips": len(devs), "what": what,
        "peak_tflops_per_chip": topo.chip.peak_tflops if topo.chip else None,
        "capacity_bytes_per_chip": topo.capacity_bytes, "strategy": config.strategy.name,
        "model": m.get("arch") or m.path, "dtype": m.dtype, "remat": m.remat,
        "attention": m.get("attention", "auto"),
        "compile_effort": effort,
        "resolution": config.data.resolution, "grad_accum": config.optim.grad_accum,
        "mesh": {k: config.mesh[k] for k in ("data", "fsdp", "tensor")},
    }
    if do_sweep:
        res = sweep(config, topo, devs, what=what, sample_steps=sample_steps, limit=sweep_max,
                    quiet=quiet)
        report.update(res)
        best = res["largest_per_device_batch"]
        if best:
            line = f"largest per-chip batch that fits {topo.name}: {best}" + (
                f" (--sweep-max {sweep_max}: larger ones not tried)"
                if res["first_too_large"] is None else "")
            last = next(t for t in res["trials"] if t["per_device_batch"] == best)
            report["result"] = last
        else:
            line = f"nothing fits {topo.name}, not even a per-chip batch of 1"
            report["result"] = res["trials"][0]
    else:
        t0 = time.perf_counter()
        step = make_step(config, topo, devs, what=what, sample_steps=sample_steps)
        build_s = round(time.perf_counter() - t0, 2)
        report["notes"] = step.notes
        report["result"] = {**compile_step(step, topo, len(devs), quiet=quiet),
                            "build_s": build_s}
        line = None
    result = report["result"]
    if result["status"] == "oom":
        report["knobs"] = knobs(config, result, len(devs))
    if not quiet:
        print(format_result(result, topo, len(devs)))
        if report.get("knobs"):
            print("  to make it fit, turn (likeliest first):")
            for k in report["knobs"]:
                print(f"    {k}")
        if line:
            print(line)
    if json_path:
        write_json(json_path, report)
        _say(f"wrote {json_path}", quiet)
    return report


def _enable_cache_if_configured() -> str | None:
    """The persistent cache dir: as already set in this process, else as `jaxmed.cli` sets
    it when ``$JAXMED_COMPILATION_CACHE`` or ``$JAXMED_CACHE`` names one, else none."""
    if jax.config.jax_compilation_cache_dir is None and (
            os.environ.get("JAXMED_COMPILATION_CACHE") or os.environ.get("JAXMED_CACHE")):
        enable_compilation_cache()
    return jax.config.jax_compilation_cache_dir


def main(argv: Sequence[str] | None = None) -> int:
    """The command line, with the exit statuses of the module docstring; a bad input is one
    ``error:`` line (`jaxmed.cli.main_guard`)."""
    return main_guard(_main, argv)


def _main(argv: list[str]) -> int:
    config, args = parse(
        argv, "python -m jaxmed.plan", __doc__.split("\n\n")[0], workdir_required=False,
        extra=[("--topology", {"default": "v5e-8", "help": "v5e-1 | v5e-4 | v5e-8 | "
                               "v4-8 | v5p-8 | v6e-8 | ... | cpu (default v5e-8)"}),
               ("--what", {"default": "train", "choices": WHATS,
                           "help": "the training step, or the sampling loop"}),
               ("--sweep", {"action": "store_true",
                            "help": "find the largest per-chip batch that fits"}),
               ("--sweep-max", {"type": int, "default": 1024,
                                "help": "largest per-chip batch --sweep tries"}),
               ("--sample-steps", {"type": int, "default": None,
                                   "help": "denoising steps (--what sample; default "
                                   "config.log.sample_steps)"}),
               ("--json", {"default": None, "help": "also write the numbers here"}),
               ("--quiet", {"action": "store_true", "help": "no progress lines"})])
    topo = plan_topologies.get(args.topology)
    if topo.platform == "tpu":
        plan_topologies.require_libtpu()
    cache = _enable_cache_if_configured()
    if cache and topo.platform == "cpu":
        _say(f"persistent compilation cache: {cache}", args.quiet)
    report = run(config, args.topology, what=args.what, do_sweep=args.sweep,
                 sweep_max=args.sweep_max, sample_steps=args.sample_steps,
                 json_path=args.json, quiet=args.quiet)
    status = report["result"]["status"]
    if args.sweep:
        return 0 if report.get("largest_per_device_batch") else 1
    return {"ok": 0, "oom": 1}.get(status, 3)


if __name__ == "__main__":
    sys.exit(main())
