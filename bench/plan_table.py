"""The README's TPU planning table: `jaxmed.plan` for (strategy, topology) cells at the
accelerator preset (``configs/finetune.py:<strategy>,sd15,<topology>``), one cell at a time.

    python bench/plan_table.py run --cells unet:v5e-8 lora:v5e-1 dora:v5e-1 [--sweep]
        [--sweep-max N] [--compile-effort -1] [-- more jaxmed.plan flags]
    python bench/plan_table.py count-flops   # model FLOPs, counted again, on every line
    python bench/plan_table.py render [--readme README.md]

``run`` plans each cell in its own process (``python -m jaxmed.plan``, under ``--timeout``)
and appends its report, with the wall time, host and load, as one JSON line to
``bench/plan_results.jsonl`` as soon as it is done: a killed run keeps the cells it
finished. ``render`` prints the table (row per strategy, column per topology; the latest
line per cell wins: the preset at effort 0, else at -1; lines with other flags are only
listed with their compile times) and with ``--readme`` puts it between the README's
``<!-- plan-table -->`` markers. A cell never planned says so.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "plan_results.jsonl")
TOPOLOGIES = ("v5e-1", "v5e-8", "v4-8", "v5p-8")
BEGIN, END = "<!-- plan-table -->", "<!-- /plan-table -->"
GIB = 2**30


def _strategies() -> tuple[str, ...]:
    sys.path.insert(0, ROOT)
    from jaxmed import strategies

    return strategies.names()


def plan_cell(strategy: str, topology: str, *, sweep: bool, timeout: int,
              extra: list[str], effort: float = 0.0, sweep_max: int = 16) -> dict:
    """Run ``jaxmed.plan`` for one cell in a subprocess; its JSON report plus how it ran."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plan.json")
        cmd = [sys.executable, "-m", "jaxmed.plan",
               "--config", f"configs/finetune.py:{strategy},sd15,{topology}",
               "--config.model.arch=sd15", "--topology", topology, "--json", out,
               f"--config.train.compile_effort={effort}",
               *(["--sweep", "--sweep-max", str(sweep_max)] if sweep else []), *extra]
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        load0 = os.getloadavg()[0]
        cpu0 = _children_cpu()
        t0 = time.perf_counter()
        # The child's progress lines are passed on as they come (a cell takes minutes).
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        tail: list[str] = []
        for line in proc.stdout:
            print(f"  {line}", end="", flush=True)
            tail = (tail + [line])[-20:]
        rc = proc.wait()
        xla = libtpu_log(proc.pid)
        timed_out = not timer.is_alive()
        timer.cancel()
        tail_text = "".join(tail)[-2000:]
        if timed_out:
            rc, tail_text = None, f"killed after {timeout} s\n{tail_text}"
        wall = round(time.perf_counter() - t0, 1)
        cpu = round(_children_cpu() - cpu0, 1)
        report = json.load(open(out)) if os.path.exists(out) else {}
    return {"strategy": strategy, "topology": topology, "sweep": sweep,
            "compile_effort": effort, "extra": extra,
            "rc": rc, "wall_s": wall, "cpu_s": cpu, "host": platform.node(), "cpus": os.cpu_count(),
            "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2),
            **({"libtpu_init_args": os.environ["LIBTPU_INIT_ARGS"]}
               if os.environ.get("LIBTPU_INIT_ARGS") else {}),
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "report": report, **({"libtpu_log": xla} if xla else {}),
            **({"log_tail": tail_text} if not report else {})}


def libtpu_log(pid: int, log_dir: str = "/tmp/tpu_logs") -> dict:
    """Where libtpu's compile spent its time, from its log of process ``pid``: the HLO
    instruction count, the HLO passes' duration (the rest of the compile is the backend's
    code generation) and the fusions its slow-operation alarm named."""
    out: dict = {}
    for path in glob.glob(os.path.join(log_dir, f"*.log.INFO.*.{pid}")):
        text = open(path, errors="replace").read()
        m = re.search(r"running hlo passes for ([\d,]+) instructions", text)
        if m:
            out["hlo_instructions"] = int(m[1].replace(",", ""))
        m = re.search(r"HLO_PASSES stage duration: (?:(\d+)m)?([\d.]+)s", text)
        if m:
            out["hlo_passes_s"] = round(60 * int(m[1] or 0) + float(m[2]), 1)
        slow = re.findall(r"Slow compilation warning:\s+(\S+)\s+is taking more than", text)
        if slow:
            out["slow_fusions"] = list(dict.fromkeys(slow))  # the alarm repeats
    return out


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished children: on a shared machine a steadier
    measure of the work than wall time."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def variant(row: dict) -> str:
    """How a line departs from the preset as shipped: its extra `jaxmed.plan` flags and
    libtpu flags ("" for none); only preset lines fill the table."""
    return " ".join([*row.get("extra", []), *([f"LIBTPU_INIT_ARGS={row['libtpu_init_args']}"]
                                              if row.get("libtpu_init_args") else [])])


def latest(path: str = RESULTS) -> dict[tuple[str, str, str, float, bool], dict]:
    """The latest line per (strategy, topology, variant, compile effort, swept)."""
    cells: dict[tuple[str, str, str, float, bool], dict] = {}
    if os.path.exists(path):
        for line in open(path):
            if line.strip():
                row = json.loads(line)
                key = (row["strategy"], row["topology"], variant(row),
                       float(row.get("compile_effort", 0.0)), bool(row.get("sweep")))
                cells[key] = row
    return cells


def table_row(cells: dict, strategy: str, topology: str, swept: bool = False) -> dict | None:
    """The line a table cell shows: the preset at XLA's default compile effort, else the
    preset at the fastest-compiling effort (`train.compile_effort=-1`); ``swept``: the
    same for a `--sweep` line."""
    return next((cells[k] for e in (0.0, -1.0)
                 if (k := (strategy, topology, "", e, swept)) in cells), None)


def cell_text(row: dict | None, swept: dict | None = None) -> str:
    """One table cell: per-chip GiB at the preset's batch, fits, the largest per-chip batch
    (from ``swept``, a `--sweep` line, where there is one), FLOPs per image."""
    if row is None:
        row, swept = swept, None
    if row is None:
        return "not compiled yet"
    rep = row.get("report") or {}
    res = rep.get("result")
    if not res:
        return f"plan failed ({'timed out' if row['rc'] is None else 'rc ' + str(row['rc'])})"
    pdb = res["per_device_batch"]
    if res["status"] == "error":
        return f"compile error at {pdb}/chip"
    mem = res.get("memory_bytes") or {}
    gib = f"{mem['total'] / GIB:.1f} GiB" if mem else "? GiB"
    if res["status"] == "oom":
        need = (res.get("oom") or {}).get("required_bytes")
        gib = f"needs {need / GIB:.1f}+ GiB" if need and not mem else gib
        return f"does not fit at {pdb}/chip ({gib})"
    if not ((swept or {}).get("report") or {}).get("largest_per_device_batch"):
        swept = None  # a sweep that found nothing says nothing about the largest batch
    sweep_rep = swept["report"] if swept else rep
    if sweep_rep.get("largest_per_device_batch"):
        big = str(sweep_rep["largest_per_device_batch"])
        if sweep_rep.get("first_too_large") is None:
            big = f">= {big} (sweep capped)"
        e = swept.get("compile_effort", 0.0) if swept else None
        if swept and e != row.get("compile_effort", 0.0):
            big += f" (swept at effort {e:g})"
    else:
        big = f">= {pdb} (not swept)"
    model = row.get("model_flops_per_image") or res.get("model_flops_per_image")
    xla = res.get("flops_per_image")
    fl = (f"{model:.2e} FLOPs/image" if model else
          f"{xla:.2e} FLOPs/image (XLA's count)" if xla else "? FLOPs/image")
    effort = row.get("compile_effort", 0.0)
    return (f"{gib} at {pdb}/chip x {rep.get('grad_accum', '?')} accum, fits; largest "
            f"{big}; {fl}" + (f" (effort {effort:g})" if effort else ""))


def render(path: str = RESULTS) -> str:
    cells = latest(path)
    rows = [s for s in _strategies()
            if any(table_row(cells, s, t) or table_row(cells, s, t, True) for t in TOPOLOGIES)]
    lines = ["| strategy | " + " | ".join(TOPOLOGIES) + " |",
             "|---|" + "---|" * len(TOPOLOGIES)]
    for s in rows:
        lines.append(f"| `{s}` | " + " | ".join(cell_text(table_row(cells, s, t),
                                                           table_row(cells, s, t, True))
                                               for t in TOPOLOGIES) + " |")
    missing = [s for s in _strategies() if s not in rows]
    if missing:
        lines.append("")
        lines.append("Not compiled yet on any topology: " + ", ".join(f"`{s}`" for s in missing)
                     + ".")
    times = [f"{s} on {t}{f' at effort {e:g}' if e else ''}{' with ' + v if v else ''}: "
             f"lowered "
             f"{r['report']['result']['lower_s']:.0f} s, compiled "
             f"{r['report']['result']['compile_s']:.0f} s"
             + (f", {r['cpu_s']:.0f} CPU-s in all" if r.get("cpu_s") else "")
             + f" ({r['utc'][:10]}, {r['cpus']} CPUs, load {r['load_before']:.1f} before)"
             for (s, t, v, e, swept), r in sorted(cells.items())
             if not swept and (r.get("report") or {}).get("result", {}).get("compile_s")
             is not None]
    if times:
        lines += ["", "Compile times (CPU-hosted, libtpu " + _libtpu() + "): " + "; ".join(times)
                  + "."]
    return "\n".join(lines)


def count_flops(path: str = RESULTS) -> None:
    """Give every line the model FLOPs per image of the current counter (`jaxmed.plan_flops`;
    lines planned before it or by an older one), traced once per strategy at its v5e-8
    preset without compiling: per image the count depends on neither mesh nor batch
    (tests/test_plan_flops.py)."""
    sys.path.insert(0, ROOT)
    from jaxmed import plan, plan_flops, plan_topologies, sharding
    from jaxmed.cli import load_config, set_override

    def read() -> list[dict]:
        return [json.loads(line) for line in open(path) if line.strip()]

    per_image: dict[str, float] = {}
    for name in dict.fromkeys(r["strategy"] for r in read()):
        config = load_config(f"configs/finetune.py:{name},sd15,v5e-8")
        set_override(config, "model.arch", "sd15")
        topo = plan_topologies.get("v5e-8")
        step = plan.make_step(config, topo, plan_topologies.devices(topo))
        with sharding.activation_sharding(step.mesh):
            jaxpr = step.jitted.trace(*step.args).jaxpr
        per_image[name] = plan_flops.count(jaxpr)["flops"] / step.images
        print(f"[plan_table] {name}: {per_image[name]:.3e} model FLOPs per image", flush=True)
    # Read again just before writing: a `run` may have appended lines meanwhile.
    rows = read()
    for row in rows:
        if (row.get("report") or {}).get("result") and row["strategy"] in per_image:
            row["model_flops_per_image"] = per_image[row["strategy"]]
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def _libtpu() -> str:
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:  # noqa: BLE001 - only a label
        return "?"


def put_in_readme(table: str, readme: str) -> None:
    text = open(readme).read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="plan cells, appending each to the results file")
    r.add_argument("--cells", nargs="+", required=True, help="strategy:topology ...")
    r.add_argument("--sweep", action="store_true", help="find the largest per-chip batch")
    r.add_argument("--sweep-max", type=int, default=16, help="largest per-chip batch tried")
    r.add_argument("--timeout", type=int, default=1500, help="seconds per cell")
    r.add_argument("--results", default=RESULTS)
    r.add_argument("--compile-effort", type=float, default=0.0,
                   help="train.compile_effort: 0 is XLA's default, -1 compiles fastest")
    r.add_argument("extra", nargs="*", help="after --: more jaxmed.plan flags")
    sub.add_parser("count-flops", help="model FLOPs per image, counted again, on every "
                   "line").add_argument("--results", default=RESULTS)
    d = sub.add_parser("render", help="print the table (and put it in the README)")
    d.add_argument("--results", default=RESULTS)
    d.add_argument("--readme", default=None)
    a = ap.parse_args()
    if a.cmd == "count-flops":
        count_flops(a.results)
        return
    if a.cmd == "render":
        table = render(a.results)
        print(table)
        if a.readme:
            put_in_readme(table, a.readme)
        return
    for cell in a.cells:
        strategy, _, topology = cell.partition(":")
        print(f"[plan_table] {strategy} on {topology}...", flush=True)
        row = plan_cell(strategy, topology, sweep=a.sweep, timeout=a.timeout, extra=a.extra,
                        effort=a.compile_effort, sweep_max=a.sweep_max)
        with open(a.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[plan_table] {cell}: {cell_text(row)} ({row['wall_s']} s)", flush=True)


if __name__ == "__main__":
    main()
