"""Data flows one way: no module imports one of a higher layer (cli → jobs → recipes/evaluation →
store/attacks/ops → lora/models/data/metrics), and the two middle packages do not import each other."""

import ast
from pathlib import Path

import loradar_cli

PACKAGE = Path(loradar_cli.__file__).parent

LAYERS: dict[str, int] = {
    "errors": 0,
    "registry": 0,
    "names": 0,
    "files": 0,
    "signals": 0,
    "lora": 1,
    "models": 1,
    "data": 1,
    "metrics": 1,
    "device": 1,
    "distributed": 1,
    "loader": 1,
    "store": 2,
    "attacks": 2,
    "ops": 2,
    "advset": 2,
    "loading": 2,
    "members": 2,
    "identifier": 2,
    "recipes": 3,
    "evaluation": 3,
    "jobs": 4,
    "combine": 4,
    "workflows": 4,
    "quickstart": 4,
    "cli": 5,
    "__main__": 5,
    "__init__": 5,
}
SIBLINGS_APART = {"recipes", "evaluation"}


def _top(module: str) -> str:
    """`loradar_cli.ops.merge` → `ops`; a module at the package root is its own top."""
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path) -> set[str]:
    """Every loradar_cli module a file imports, at any depth (lazy imports inside functions count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "loradar_cli":
            found.update(f"loradar_cli.{a.name}" for a in node.names if a.name != "__version__")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loradar_cli."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("loradar_cli."))
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts)


def test_every_top_level_module_has_a_layer():
    tops = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").is_file()
    }
    assert tops <= set(LAYERS), f"give these a layer: {sorted(tops - set(LAYERS))}"


def test_no_module_imports_a_higher_layer():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        source = _top(_module_name(path))
        for imported in _imports(path):
            target = _top(imported)
            upward = LAYERS[target] > LAYERS[source]
            sideways = source != target and {source, target} <= SIBLINGS_APART
            if upward or sideways:
                violations.append(f"{_module_name(path)} imports {imported}")
    assert not violations, "\n".join(sorted(violations))
