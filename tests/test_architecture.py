"""The shape of the package, checked from its imports (``ast``, no import executed).

* no import cycle between modules (function-level imports included: they hide coupling, not
  remove it);
* no import that runs back up the layers of ``LAYERS`` (data flows one way: math -> contract ->
  devices -> mapping -> training -> studies -> commands);
* an import inside a function only with a comment (same line or the line above) saying why:
  an optional extra, or a measured import-time cost.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "hwloop"

#: room -> layer; a module may import its own room, and rooms of a lower layer only. The most
#: specific room (longest prefix) of a module counts.
LAYERS = {
    "hwloop.errors": 0,
    "hwloop.ttfs": 1, "hwloop.quant": 1, "hwloop.energy": 1, "hwloop.data": 1,
    "hwloop.interop": 2, "hwloop.provenance": 2,
    "hwloop.devices": 3,           # the contract
    "hwloop.emulator": 4, "hwloop.wire": 4,
    "hwloop.chip": 5,
    "hwloop.devices.open": 6,      # one string -> a device: knows every backend
    "hwloop.mapping": 6,
    "hwloop.calibrate": 7,
    "hwloop.train": 8, "hwloop.testing": 8,
    "hwloop.studies": 9,
    "hwloop.commands": 10,
    "hwloop.cli": 11,
    "hwloop": 12,                  # the package's own __init__ (re-exports)
}
REASONS = ("optional", "import-time", "lazy", "cycle")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def room(mod: str) -> str:
    best = ""
    for r in LAYERS:
        if (mod == r or mod.startswith(r + ".")) and len(r) > len(best):
            best = r
    return best or mod


def imports(path: Path):
    """(target module, line number, inside a function?) of every hwloop import in ``path``."""
    tree = ast.parse(path.read_text())
    mod = module_name(path)
    out = []

    def visit(node, in_fn):
        for child in ast.iter_child_nodes(node):
            fn = in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative
                    pkg = mod.split(".")
                    if not path.name == "__init__.py":
                        pkg = pkg[:-1]
                    pkg = pkg[:len(pkg) - child.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                if base.startswith("hwloop"):
                    for alias in child.names:  # `from hwloop.x import y` may name a module y
                        sub = f"{base}.{alias.name}"
                        target = sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists() \
                            or (PKG.parent / sub.replace(".", "/")).is_dir() else base
                        out.append((target, child.lineno, in_fn))
            elif isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_fn) for a in child.names if a.name.startswith("hwloop"))
            visit(child, fn)
    visit(tree, False)
    return out


FILES = sorted(PKG.rglob("*.py"))
GRAPH = {module_name(p): imports(p) for p in FILES}


def runs_up(mod: str, target: str) -> bool:
    """Whether ``mod`` importing ``target`` runs back up (or sideways across) the layers."""
    src, dst = room(mod), room(target)
    return dst != src and not src.startswith(dst + ".") and LAYERS.get(dst, -1) >= LAYERS.get(src, 99)


def test_the_layer_rule_itself():
    assert runs_up("hwloop.quant", "hwloop.devices.base")  # the import issue #11 named
    assert runs_up("hwloop.emulator.device", "hwloop.wire.codec")  # siblings stay apart
    assert runs_up("hwloop.ttfs.network", "hwloop.train.hil")
    assert not runs_up("hwloop.train.hil", "hwloop.ttfs.network")
    assert not runs_up("hwloop.devices.open", "hwloop.emulator.device")  # the one factory
    assert not runs_up("hwloop.wire.host", "hwloop.wire.codec")


def test_no_import_runs_back_up_the_layers():
    bad = []
    for mod, imps in GRAPH.items():
        src = room(mod)
        for target, line, _ in sorted(set(imps)):
            dst = room(target)
            if runs_up(mod, target):
                bad.append(f"{mod}:{line} imports {target} ({dst}, layer {LAYERS.get(dst)} >= {src}, "
                           f"layer {LAYERS.get(src)})")
    assert not bad, "imports that run back up:\n" + "\n".join(sorted(set(bad)))


def test_every_module_has_a_room():
    assert not [m for m in GRAPH if room(m) not in LAYERS], "add the new room to LAYERS"


def test_no_import_cycle():
    mods = set(GRAPH)
    edges = {m: {t for t, _, _ in GRAPH[m] if t in mods and t != m} for m in GRAPH}
    seen, stack, cycles = {}, [], []

    def dfs(m):
        seen[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if seen.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in seen:
                dfs(t)
        stack.pop()
        seen[m] = 2
    for m in sorted(mods):
        if m not in seen:
            dfs(m)
    # a package's __init__ re-exporting its own modules is not a cycle of design
    cycles = [c for c in cycles if not any(len(set(c)) == 2 and (a + ".") in b or (b + ".") in a
                                           for a, b in [tuple(sorted(set(c)))] if len(set(c)) == 2)]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def function_imports(path: Path):
    """(import line, enclosing function's first line) of every hwloop import inside a function."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node, fn_line):
        for child in ast.iter_child_nodes(node):
            line = child.lineno if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else fn_line
            if fn_line is not None and isinstance(child, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in child.names] if isinstance(child, ast.Import) else [child.module or ""]
                if getattr(child, "level", 0) or any(n.startswith("hwloop") for n in names):
                    out.append((child.lineno, fn_line))
            visit(child, line)
    visit(tree, None)
    return out


def test_function_level_imports_say_why():
    """A comment naming the reason (optional extra, import-time cost, lazy, cycle) on the import's
    line, or anywhere in its function above it, is required."""
    bad = []
    for p in FILES:
        lines = p.read_text().splitlines()
        for line, fn_line in function_imports(p):
            span = lines[fn_line - 1:line]
            comments = " ".join(x.split("#", 1)[1] for x in span if "#" in x).lower()
            if not any(r in comments for r in REASONS):
                bad.append(f"{module_name(p)}:{line}: {lines[line - 1].strip()}")
    assert not bad, ("imports inside functions without a comment saying why (optional extra or "
                     "measured import-time cost):\n" + "\n".join(bad))


#: "about 500 lines a module, about 80 a function" (issue #11), with a little slack
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 520, 85


def test_modules_and_functions_stay_small():
    big, long_fns = [], []
    for p in FILES:
        text = p.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            big.append(f"{module_name(p)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_fns.append(f"{module_name(p)}.{node.name}: {n} lines")
    assert not big and not long_fns, "split these:\n" + "\n".join(big + long_fns)
