"""Tables, files and plots: metrics.{json,csv,md} of one evaluation, the study's results.

Everything here formats numbers that were computed elsewhere; nothing is recomputed. NaN /
missing values are written as empty CSV cells, ``null`` in JSON and "—" in markdown.
Files are written atomically (`jaxmed.files`: temporary file + rename), so a killed run
never leaves a half-written result that looks finished.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxmed import files, storage

DASH = "—"

# Columns of metrics.csv / the markdown table of one evaluation (`jaxmed.evaluate` fills a
# row per condition with these keys), in order; None values print as blanks / "—".
COLUMNS: tuple[str, ...] = (
    "condition", "n_generated", "n_real", "fid_inception", "fid_domain", "kid_inception",
    "kid_inception_sd", "kid_domain", "kid_domain_sd", "vendi_domain", "vendi_domain_real",
    "vendi_inception", "align_auroc", "align_accuracy", "align_hit",
    "clip_score",
)

COLUMN_TITLES = {
    "condition": "condition",
    "n_generated": "N gen",
    "n_real": "N real",
    "fid_inception": "FID-Inception",
    "fid_domain": "domain FID",
    "kid_inception": "KID-Inception",
    "kid_inception_sd": "KID-Inc. SD",
    "kid_domain": "domain KID",
    "kid_domain_sd": "domain KID SD",
    "vendi_domain": "Vendi (domain)",
    "vendi_domain_real": "Vendi real (domain)",
    "vendi_inception": "Vendi (Inception)",
    "align_auroc": "align AUROC",
    "align_accuracy": "align acc",
    "align_hit": "align hit",
    "clip_score": "CLIPScore",
}


# --------------------------------------------------------------------------------------
# Small helpers


def clean(x: Any) -> Any:
    """JSON-safe copy: NaN / inf -> None, numpy scalars / arrays -> Python."""
    if isinstance(x, Mapping):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_json(path: str, obj: Any) -> str:
    """``obj`` made JSON-safe (`clean`) and written atomically; NaN can never slip through."""
    return files.write_json(path, clean(obj), indent=1, allow_nan=False)


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def fmt(v: Any, digits: int = 3) -> str:
    """A table cell: None / NaN -> "—", ints as ints, floats to ``digits`` decimals below
    100 and 2 above (an FID of 398.21: finer than its sampling noise at the study's N, so
    tables agree to the digits shown; metrics.json and metrics.csv keep full precision)."""
    if v is None:
        return DASH
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return DASH
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:.2f}"
    return str(v)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 3) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(v, digits) for v in r) + " |")
    return "\n".join(lines)


def csv_text(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(headers)
    for r in rows:
        w.writerow(["" if (v is None or (isinstance(v, float) and not math.isfinite(v)))
                    else (repr(float(v)) if isinstance(v, float) else v) for v in r])
    return buf.getvalue()


# --------------------------------------------------------------------------------------
# One evaluation: metrics.{json,csv,md}


def _metric_columns(result: Mapping) -> list[str]:
    present = set()
    for row in result["rows"].values():
        present.update(k for k, v in row.items() if v is not None)
    return [c for c in COLUMNS if c in present or c in ("condition", "n_generated", "n_real",
                                                         "fid_inception")]


def metrics_markdown(result: Mapping) -> str:
    cols = _metric_columns(result)
    rows = [[result["rows"][c].get(k) for k in cols] for c in result["conditions"]]
    out = [f"# Evaluation: {result['generated']}", "",
           f"Real images: {result['real']} ({result['n_real']}); generated: "
           f"{result['n_generated']}. FID route: {fid_routes_text(result)}.", "",
           md_table([COLUMN_TITLES.get(c, c) for c in cols], rows), ""]
    if not result["inception"]["available"]:
        out += ["FID-Inception: missing. " + result["inception"]["message"], ""]
    if result.get("notes"):
        out += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(out)


def fid_routes_text(result: Mapping) -> str:
    """The FID method asked for and the routes that computed the cells, e.g. "auto (eigh:
    Edema, Pneumothorax; sqrtm: No Finding, all)" (per cell and feature kind in
    metrics.json's ``fid_routes``)."""
    method = result.get("fid_method", "auto")
    by_route: dict[str, list[str]] = {}
    for cond, kinds in result.get("fid_routes", {}).items():
        for route in sorted(set(kinds.values())):
            by_route.setdefault(route, []).append(cond)
    if not by_route:
        return method
    if len(by_route) == 1:
        return f"{method} ({next(iter(by_route))} for every cell)"
    return f"{method} (" + "; ".join(f"{r}: {', '.join(c)}"
                                     for r, c in sorted(by_route.items())) + ")"


def write_metrics(result: Mapping, out_dir: str) -> dict:
    """metrics.json (everything), metrics.csv (a row per condition + all), metrics.md."""
    storage.makedirs(out_dir)  # may be a storage URL: files.* upload each file whole
    paths = {"json": write_json(os.path.join(out_dir, "metrics.json"), result)}
    rows = [[result["rows"][c].get(k) for k in COLUMNS] for c in result["conditions"]]
    paths["csv"] = files.atomic_write(os.path.join(out_dir, "metrics.csv"),
                                      csv_text(COLUMNS, rows))
    paths["md"] = files.atomic_write(os.path.join(out_dir, "metrics.md"), metrics_markdown(result))
    return paths


# --------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_fid_vs_params(points: Sequence[tuple[str, float | None, float | None]], path: str,
                       *, ylabel: str = "FID", base: float | None = None,
                       title: str = "") -> str:
    """Scatter of (name, trainable parameters, FID); log-x; a dashed line at the base FID."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, n, v in points:
        if n is None or v is None or not n > 0 or not math.isfinite(v):
            continue
        ax.scatter([n], [v], s=28)
        ax.annotate(name, (n, v), textcoords="offset points", xytext=(4, 3), fontsize=7)
    if base is not None and math.isfinite(base):
        ax.axhline(base, ls="--", color="grey", lw=1)
        ax.text(ax.get_xlim()[0], base, " un-tuned base", va="bottom", fontsize=7,
                color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{ylabel} vs trainable parameters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


Point = tuple  # (fraction, value) or (fraction, value, lo, hi)


def _finite_points(pts: Iterable[Point]) -> list[tuple[float, float, float, float]]:
    """(fraction, value, lo, hi) with a finite value, sorted; NaN bounds where not given."""
    out = []
    for p in pts:
        f, v = p[0], p[1]
        lo, hi = (p[2], p[3]) if len(p) >= 4 else (None, None)
        if v is None or not math.isfinite(v):
            continue
        out.append((float(f), float(v), math.nan if lo is None else float(lo),
                    math.nan if hi is None else float(hi)))
    return sorted(out)


def _curve(ax, pts, color, label, **kw):
    """A line with its 95% band (a filled band over >= 2 fractions with bounds, error bars
    on a lone point)."""
    fs, vs, lo, hi = (np.asarray(x) for x in zip(*pts))
    x = 100 * fs
    ax.plot(x, vs, color=color, label=label, **kw)
    ok = np.isfinite(lo) & np.isfinite(hi)
    if ok.sum() >= 2:
        ax.fill_between(x[ok], lo[ok], hi[ok], color=color, alpha=0.15, lw=0)
    elif ok.any():
        ax.errorbar(x[ok], vs[ok], yerr=[vs[ok] - lo[ok], hi[ok] - vs[ok]], color=color,
                    capsize=3, lw=1, fmt="none")


def plot_auroc_vs_fraction(real_only: Sequence[Point],
                           per_model: Mapping[str, Sequence[Point]],
                           path: str, *, synthetic_only: Mapping[str, Any] | None = None,
                           title: str = "") -> str:
    """Macro AUROC vs real fraction: the real-only curve (black), one real + synthetic line
    per model, and each model's synthetic-only score as an x at the left edge. A point
    ``(fraction, value, lo, hi)`` draws its 95% interval over the runs (seeds x repeats;
    `jaxmed.eval.tables.regime_intervals`) as a band; ``(fraction, value)`` a bare line.
    ``synthetic_only`` values: a number or (value, lo, hi)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    cmap = plt.get_cmap("tab20")

    pts = _finite_points(real_only)
    if pts:
        _curve(ax, pts, "black", "real only", lw=2.2, marker="o")
    names = list(dict.fromkeys([*per_model, *(synthetic_only or {})]))
    for i, name in enumerate(names):
        color = cmap(i % 20)
        pts = _finite_points(per_model.get(name, ()))
        if pts:
            _curve(ax, pts, color, f"{name} + real", lw=1.1, marker=".", alpha=0.9)
        v = (synthetic_only or {}).get(name)
        p = _finite_points([(0.005, *v)] if isinstance(v, (tuple, list)) else [(0.005, v)])
        if p:
            _, v, lo, hi = p[0]
            ax.scatter([0.5], [v], marker="x", s=20, color=color)
            if math.isfinite(lo) and math.isfinite(hi):
                ax.plot([0.5, 0.5], [lo, hi], color=color, lw=0.8, alpha=0.7)
    if synthetic_only:
        ax.annotate("x: synthetic only", (0.01, 0.01), xycoords="axes fraction", fontsize=7)
    if any(len(p) >= 4 for p in real_only):
        ax.annotate("bands: 95% t interval over seeds x repeats", (0.01, 0.05),
                    xycoords="axes fraction", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("real training data (%)")
    ax.set_ylabel("macro AUROC (real test)")
    ax.set_title(title or "Downstream classifier: macro AUROC vs real fraction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_intervals(rows: Sequence[tuple[str, float, float, float, str]], path: str, *,
                   xlabel: str, ref: float | None = None, ref_label: str = "",
                   title: str = "") -> str:
    """Horizontal 95% intervals, one row per (label, value, lo, hi, group) from the top,
    coloured by group; a dashed vertical line at ``ref`` (zero, or the real-vs-real floor)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.32 * max(1, len(rows))), dpi=110)
    cmap = plt.get_cmap("tab10")
    groups = list(dict.fromkeys(g for *_, g in rows))
    for i, (label, v, lo, hi, g) in enumerate(rows):
        y = len(rows) - 1 - i
        color = cmap(groups.index(g) % 10)
        if all(x is not None and math.isfinite(x) for x in (lo, hi)):
            ax.plot([lo, hi], [y, y], color=color, lw=2, alpha=0.8)
        if v is not None and math.isfinite(v):
            ax.scatter([v], [y], color=color, s=22, zorder=3,
                       label=g if g and label == next(r[0] for r in rows if r[4] == g)
                       else None)
    if ref is not None and math.isfinite(ref):
        ax.axvline(ref, ls="--", color="grey", lw=1)
        if ref_label:
            ax.text(ref, len(rows) - 0.5, f" {ref_label}", fontsize=7, color="grey",
                    va="bottom")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows][::-1], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    if any(groups):
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
