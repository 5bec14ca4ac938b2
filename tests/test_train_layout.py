"""The layout's rules, read from the source (ARCHITECTURE.md, "the rules that keep it livable"): no import
circle among the modules of wgfcore/, kernels/ and train/, imports inside functions included; the
dependency direction train -> wgfcore -> kernels; no file in train/ over 350 lines; sys.path edited
only by the entry script; matplotlib's backend chosen in one place; a run's config read by key only
where the typed Config is made."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wgfcore", "kernels", "train")
ENTRY_SCRIPTS = {"train/run.py"}


def _modules() -> dict:
    """{dotted module name: path} of every .py file of the three packages."""
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = p
    return out


def _imported(path: Path, name: str, known: set) -> set:
    """The known modules `path` imports anywhere (module level, functions, classes)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            targets = [root] + [f"{root}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `from pkg import mod` names a module; `from mod import f` does not
                t = t.rpartition(".")[0]
            if t and t != name and not t.startswith(name + "."):  # a package importing its own parts is no circle
                found.add(t)
    return found


def _graph() -> dict:
    mods = _modules()
    return {m: _imported(p, m, set(mods)) for m, p in mods.items()}


def _circle(graph: dict):
    """One import circle as a list of modules, or None (iterative depth-first search)."""
    state, parent = {}, {}
    for start in graph:
        if start in state:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        state[start] = "open"
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = "done"
                stack.pop()
            elif state.get(nxt) == "open":
                path = [node]
                while path[-1] != nxt:
                    path.append(parent[path[-1]])
                return path[::-1] + [node]
            elif nxt not in state:
                state[nxt], parent[nxt] = "open", node
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
    return None


def test_the_circle_finder_finds_circles_inside_functions(tmp_path):
    # the check itself can fail: a circle hidden in a function body is found
    (tmp_path / "a.py").write_text("def f():\n    from b import g\n")
    (tmp_path / "b.py").write_text("import c\n")
    (tmp_path / "c.py").write_text("def h():\n    import a\n")
    known = {"a", "b", "c"}
    graph = {m: _imported(tmp_path / f"{m}.py", m, known) for m in known}
    assert sorted(_circle(graph)[:-1]) == ["a", "b", "c"]
    graph["c"] = set()
    assert _circle(graph) is None


def test_no_import_circle_anywhere():
    circle = _circle(_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_dependencies_point_one_way():
    graph = _graph()
    for m, deps in graph.items():
        if not m.startswith("train"):
            assert not [d for d in deps if d.startswith("train")], f"{m} imports train"
        if m.startswith("kernels"):
            assert not [d for d in deps if d.startswith("wgfcore")], f"{m} imports wgfcore"
    # inside train/: jobs and experiments sit on top; the engine does not reach up to them
    for m, deps in graph.items():
        if m.startswith(("train.engine", "train.data", "train.evaluation")):
            assert not [d for d in deps if d.startswith(("train.jobs", "train.experiments", "train.run"))], m


def test_train_files_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / "train").rglob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > 350}
    assert not big, f"files over 350 lines: {big}"


@pytest.mark.parametrize("packages, pattern, allowed", [
    (PACKAGES, r"sys\.path\.(insert|append)", ENTRY_SCRIPTS),
    (PACKAGES, r"matplotlib\.use\(", {"train/evaluation/plots.py"}),
    # a run's config dict is read by key where the typed Config is made and checked, nowhere else
    (("train",), r"\bcfg\[\"|\bcfg\.get\(|\becfg\[\"|\becfg\.get\(", {"train/engine/config.py", "train/engine/schema.py"}),
])
def test_one_home(packages, pattern, allowed):
    where = {str(p.relative_to(ROOT)) for pkg in packages for p in (ROOT / pkg).rglob("*.py")
             if re.search(pattern, p.read_text(encoding="utf-8"))}
    assert where <= allowed, f"{pattern} outside {sorted(allowed)}: {sorted(where - allowed)}"
