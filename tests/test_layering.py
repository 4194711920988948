"""The import rule of docs/architecture.md: a package imports only from packages to its left."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dsbp"

# package -> the dsbp packages it may import (besides itself)
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "models": {"core"},
    "layers": {"core"},
    "optim": {"core", "layers"},
    "diagnostics": {"core", "layers", "optim", "models"},
    "baselines": {"core", "layers", "optim", "diagnostics"},
    "extensions": {"core", "layers", "optim", "diagnostics", "baselines", "data", "models"},
    "plots": {"core"},
    "experiments": {"core", "layers", "optim", "diagnostics", "baselines", "extensions", "data",
                    "models", "plots"},
}
# The command-line package (all argument parsing) sits on top of everything.
ALLOWED["cli"] = set(ALLOWED)
TOP = {"__init__": {"optim"}}


def _dsbp_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for n in names:
            parts = n.split(".")
            if parts[0] == "dsbp" and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] == "dsbp":  # `from dsbp import DSBP` re-exports dsbp.optim
                found.add("optim")
    return found


def test_every_package_imports_only_to_its_left():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        pkg = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        allowed = ALLOWED.get(pkg, TOP.get(pkg))
        assert allowed is not None, f"{rel}: package {pkg!r} is not in the layering table"
        for imp in _dsbp_imports(path) - {pkg}:
            if imp not in allowed:
                bad.append(f"{rel} imports dsbp.{imp}")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_public_api_is_small():
    import dsbp

    assert set(dsbp.__all__) == {"DSBP", "DistributedDSBP", "SpectralProjector", "__version__"}
