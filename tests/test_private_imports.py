"""No attnlab module imports another module's private (underscore) names: what one module shares
with another is public, with a docstring."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "attnlab"


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attnlab"):
                found += [
                    f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not found, found
