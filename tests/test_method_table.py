"""The method table as the one home of method knowledge: layers import downwards only (runtime → methods → sites),
nothing outside hub/methods branches on a method's name, docs/methods.md is generated from the table, and a
third-party method joins through the entry point."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from hub.errors import Incompatible
from hub.formats import Adapter
from hub.methods import all_methods, lookup, table
from hub.methods.base import Method

ROOT = Path(__file__).resolve().parent.parent
HUB = ROOT / "hub"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, module_level: bool) -> set[str]:
    """The hub modules ``path`` imports (with every package on the way, which Python imports first)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` imports never run
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    known = {module_name(p) for p in HUB.rglob("*.py")}
    return {name for name in found if name in known}


def test_runtime_methods_and_sites_import_downwards_only() -> None:
    layer = {"hub.sites": 0, "hub.methods": 1, "hub.runtime": 2}
    for path in HUB.rglob("*.py"):
        name = module_name(path)
        own = next((layer[p] for p in layer if name == p or name.startswith(p + ".")), None)
        if own is None:
            continue
        for target in imports(path, module_level=False):
            other = next((layer[p] for p in layer if target == p or target.startswith(p + ".")), None)
            assert other is None or other <= own, f"{name} imports {target}, a layer above it"


def test_no_module_level_import_cycle_in_hub() -> None:
    graph = {module_name(p): imports(p, module_level=True) for p in HUB.rglob("*.py")}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1 and target not in (name, *_packages(name)):
                raise AssertionError(f"import cycle: {' -> '.join(trail[trail.index(target):] + [target])}"
                                     if target in trail else f"import cycle through {target}")
            if target not in state:
                visit(target, [*trail, target])
        state[name] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def _packages(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


# Outside hub/methods, a method's name in a comparison or a literal collection is a branch on it.


def test_no_module_outside_the_method_table_branches_on_a_method_name() -> None:
    names = {method.name for method in all_methods()} | {label for m in all_methods() for label in m.recipes}
    found = []
    for path in HUB.rglob("*.py"):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith("hub/methods/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            candidates = []
            if isinstance(node, ast.Compare):
                candidates = [node.left, *node.comparators]
            elif isinstance(node, (ast.Set, ast.Tuple, ast.List)):
                candidates = list(node.elts)
            elif isinstance(node, ast.Dict):
                candidates = [key for key in node.keys if key is not None]
            for item in candidates:
                elements = item.elts if isinstance(item, (ast.Tuple, ast.Set, ast.List)) else [item]
                for element in elements:
                    if isinstance(element, ast.Constant) and element.value in names:
                        found.append(f"{relative}:{element.lineno} {element.value!r}")
    assert found == []


def test_docs_methods_md_is_generated_from_the_table() -> None:
    done = subprocess.run([sys.executable, "scripts/methods_doc.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_every_method_is_consistent_with_its_flags() -> None:
    for method in all_methods():
        assert lookup(method.peft_type) is method and lookup(method.peft_type.lower()) is method
        assert method.attachable == (type(method).attach is not Method.attach), method
        assert (not method.low_rank) or type(method).merge_terms is not Method.merge_terms, method
        assert (not method.summable or method.low_rank) == (type(method).weighted_sum is Method.weighted_sum
                                                            or method.low_rank), method
        assert (not method.recipes) or (method.make is not None and method.default_lr), method


class Plugin(Method):
    peft_type = "MY_VERA"
    name = "my_vera"
    attachable = True

    def attach(self, model, adapter, *, name, weight=1.0):
        raise Incompatible("my_vera attached")


class FakeEntryPoint:
    value = "tests.test_method_table:Plugin"

    def load(self):
        return Plugin


def test_a_third_party_method_joins_through_the_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table, "entry_points", lambda group: [FakeEntryPoint()] if group == "adapter_hub.methods"
                        else [])
    monkeypatch.setattr(table, "_plugins", None)
    monkeypatch.setattr(table, "_loaded", {})
    import torch

    adapter = Adapter(config={"peft_type": "MY_VERA"}, tensors={"x": torch.ones(1)})
    assert adapter.method == "my_vera" and "MY_VERA" in table.peft_types()
    from hub.runtime import attach

    with pytest.raises(Incompatible, match="my_vera attached"):
        attach(torch.nn.Linear(1, 1), adapter)
