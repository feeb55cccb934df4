"""The layout as a newcomer reads it: no import cycle in ``disalign_det``, no module over 450 lines
without a reason stated at its top, and the README's layout table matching the tree."""

import ast
import os
import re

from common import REPO

PACKAGE = os.path.join(REPO, "disalign_det")
MAX_LINES = 450
# A module longer than MAX_LINES says why in its first lines, e.g. "Longer than 450 lines: ...".
LONG_REASON = re.compile(r"longer than 450 lines\s*(because|:)", re.IGNORECASE)


def _modules():
    """{dotted name: path} of every module of disalign_det (a package is its __init__)."""
    out = {}
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), REPO)[: -len(".py")]
                parts = rel.split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = os.path.join(folder, f)
    return out


def _imports(name, path, modules):
    """The disalign_det modules ``name`` imports (anywhere in the file: a deferred import inside a
    function still makes a cycle, it only hides it). ``from pkg import sub`` counts as importing
    the submodule, not the package."""
    is_pkg = path.endswith("__init__.py")
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [
                f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names
            ]
        else:
            continue
        for t in targets:
            # `import disalign_det.data.synthetic` imports that module (and its parents, which are
            # not edges: every module is imported through its package).
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state = {}
    stack = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _graph():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = _imports(name, path, modules)
        # A package's __init__ imports its own submodules and they may use `from . import x` (a
        # sibling) or `from .. import compat`: edges to an enclosing package are not cycles.
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def test_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_disalign_det():
    graph = _graph()
    assert "disalign_det.data.frequency" in graph and "disalign_det.data.synthetic.cache" in graph
    # The data layer's leaf imports nothing of ours.
    assert graph["disalign_det.data.frequency"] == set()
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_over_450_lines_without_a_reason():
    too_long = []
    for name, path in _modules().items():
        with open(path) as f:
            lines = f.read().splitlines()
        if len(lines) > MAX_LINES and not LONG_REASON.search("\n".join(lines[:40])):
            too_long.append(f"{os.path.relpath(path, REPO)} ({len(lines)} lines)")
    assert not too_long, (
        f"modules over {MAX_LINES} lines without 'Longer than 450 lines: <why>' in their first 40 "
        f"lines: {too_long}"
    )


# --------------------------------------------------------------------------------------------------
# README layout table
# --------------------------------------------------------------------------------------------------


def _layout_rows():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([^`]+)` \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = re.findall(r"`([^`]+)`", m.group(2))
    return rows


def _listed_files(folder, exts):
    return sorted(
        f
        for f in os.listdir(os.path.join(REPO, folder))
        if os.path.isfile(os.path.join(REPO, folder, f)) and f.endswith(exts)
    )


def test_readme_layout_table_matches_the_tree():
    rows = _layout_rows()
    assert rows, "README.md has no '## Layout' table"
    for path in rows:
        assert os.path.exists(os.path.join(REPO, path)), f"README layout lists missing {path}"

    # Every subpackage (nested ones too) and top-level module of disalign_det has a row; a
    # package's row names each of its modules, and names none that does not exist.
    expected = {}
    for entry in sorted(os.listdir(PACKAGE)):
        if entry.endswith(".py"):
            expected[f"disalign_det/{entry}"] = None
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        rel = os.path.relpath(folder, REPO)
        if folder != PACKAGE and "__init__.py" in files:
            expected[f"{rel}/"] = _listed_files(rel, ".py")
    # The lab (experiments, not installed) beside the library.
    expected["lab/"] = _listed_files("lab", ".py")
    # The folders of scripts a user runs: each file named in its row.
    expected["tools/"] = _listed_files("tools", ".py")
    expected["datasets/"] = _listed_files("datasets", (".py", ".md"))
    expected["scripts/"] = _listed_files("scripts", (".py", ".sh"))
    for path, files in expected.items():
        assert path in rows, f"README layout table has no row for {path}"
        if files is None:
            continue
        named = {n for n in rows[path] if "/" not in n and re.search(r"\.(py|sh|md)$", n)}
        files = set(files) - {"__init__.py"}
        assert named <= files, f"README row {path} names files that do not exist: {named - files}"
        assert files <= named, f"README row {path} does not name {sorted(files - named)}"
