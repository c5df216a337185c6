"""The shape of the code (docs/architecture.md): every module imports on its own, imports go one
way (core -> convert -> application, never back), and no class or function grows past a size a
reader takes in at once."""

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("npo_jax", "convert")
APPLICATION = ("npo_jax.cli", "npo_jax.train", "npo_jax.demo", "npo_jax.sweep", "npo_jax.parity_run")
MAX_CLASS_LINES, MAX_FUNCTION_LINES = 200, 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
MODULES = [_module_name(p) for p in SOURCES]


def _is_core(module: str) -> bool:
    return module.startswith("npo_jax") and not any(module == a or module.startswith(a + ".") for a in APPLICATION)


_PROBE = """
import importlib, sys
importlib.import_module(sys.argv[1])
print(sorted(m for m in sys.modules if m == "convert" or m.startswith("convert.")))
"""


def _import_alone(module: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", _PROBE, module], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


@cache
def _fresh_imports() -> dict[str, subprocess.CompletedProcess]:
    """Every module imported in a fresh interpreter of its own, two at a time."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(MODULES, pool.map(_import_alone, MODULES), strict=True))


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module):
    result = _fresh_imports()[module]
    assert result.returncode == 0, f"python -c 'import {module}' failed:\n{result.stderr[-3000:]}"
    if _is_core(module):
        assert result.stdout.strip().splitlines()[-1] == "[]", f"importing {module} loads {result.stdout.strip()}"


def _contracts() -> dict[str, dict]:
    api = pytest.importorskip("importlinter.api")
    config = api.read_configuration(str(ROOT / "pyproject.toml"))
    return {c["id"]: c for c in config["contracts_options"]}


def _covered(module: str, sources: list[str]) -> bool:
    return any(module == s or module.startswith(s + ".") for s in sources)


def test_contracts_cover_the_whole_core():
    """A new npo_jax module must be placed: in the core contract's list, or in the application layer."""
    contracts = _contracts()
    core_sources = contracts["core-not-convert"]["source_modules"]
    assert contracts["core-not-convert"]["forbidden_modules"] == ["convert"]
    assert sorted(contracts["application-on-top"]["forbidden_modules"]) == sorted(APPLICATION)
    assert sorted(contracts["application-on-top"]["source_modules"]) == sorted([*core_sources, "convert"])
    unplaced = [m for m in MODULES if _is_core(m) and m != "npo_jax" and not _covered(m, core_sources)]
    assert not unplaced, f"add these to the contracts in pyproject.toml, or to APPLICATION here: {unplaced}"


def test_imports_go_one_way():
    """What `lint-imports` checks, with the import graph it builds (imports inside functions count)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    upper = [m for m in graph.modules if m.startswith("convert") or not _is_core(m)]
    application = [m for m in graph.modules if m.startswith("npo_jax") and not _is_core(m)]
    broken = []
    for module in sorted(graph.modules):
        targets = upper if _is_core(module) else application if module.startswith("convert") else []
        for target in targets:
            chain = graph.find_shortest_chain(importer=module, imported=target)
            if chain:
                broken.append(" -> ".join(chain))
    assert not broken, "imports against the layers:\n" + "\n".join(broken)


def _oversized(path: Path):
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.ClassDef):
            limit = MAX_CLASS_LINES
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            limit = MAX_FUNCTION_LINES
        else:
            continue
        lines = node.end_lineno - node.lineno + 1
        if lines > limit:
            yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines (at most {limit})"



def _parse(path):
    """ast.parse, once more on CPython 3.11's "AST constructor recursion depth mismatch": its
    parser's depth counter is shared state that another thread's parse (left running by an
    earlier test's background writer) can upset; the file itself parses."""
    try:
        return ast.parse(path.read_text(), str(path))
    except SystemError:
        return ast.parse(path.read_text(), str(path))

@pytest.mark.parametrize("path", SOURCES, ids=MODULES)
def test_no_oversized_class_or_function(path):
    """Lines from `def`/`class` to the node's last line: at most 200 for a class, 60 for a function."""
    found = list(_oversized(path))
    assert not found, "\n".join(found)
