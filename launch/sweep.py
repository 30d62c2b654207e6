"""Scripted launches: one `jaxmed.train` run per strategy, sequentially or printed for a
scheduler.

    python launch/sweep.py --config configs/finetune.py --workdir /runs/sweep \
        --strategies lora dora bitfit -- --config.train.max_steps=2000
    python launch/sweep.py ... --print    # one command per line (for a job array)

Each strategy gets WORKDIR/<strategy>; a finished run (summary.json present) is skipped, an
interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

from jaxmed import strategies


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/finetune.py")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--strategies", nargs="+", default=list(strategies.STUDY))
    ap.add_argument("--print", action="store_true", help="print the commands, run nothing")
    a = ap.parse_args(argv)
    for name in a.strategies:
        strategies.options(name)  # unknown names fail here, before anything runs
    failed = []
    for name in a.strategies:
        wd = os.path.join(a.workdir, name)
        cmd = [sys.executable, "-m", "jaxmed.train", "--config", f"{a.config}:{name}",
               "--workdir", wd, *extra]
        if a.print:
            print(shlex.join(cmd))
            continue
        if os.path.exists(os.path.join(wd, "summary.json")):
            print(f"[sweep] {name}: done, skipped")
            continue
        print(f"[sweep] {name}: {shlex.join(cmd)}", flush=True)
        if subprocess.run(cmd).returncode:
            failed.append(name)
    if failed:
        print(f"[sweep] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
