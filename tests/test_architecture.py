"""The package layering of DESIGN.md section 2, read from the source: which product package may
import which, no import cycle between product modules, and `transport` loading without `bagel`.

Imports are parsed with `ast`, function-level ones included, so a lazy import cannot hide a
forbidden edge or a cycle.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PACKAGES = (
    "bagel",
    "protos",
    "serving",
    "step_cache",
    "transport",
    "diffusion_service",
    "prefill_service",
    "client",
    "gateway",
)
SERVICES = {"diffusion_service", "prefill_service"}
# package -> top-level names it must never import (DESIGN.md section 2).
FORBIDDEN = {
    "bagel": {
        "serving",
        "step_cache",
        "transport",
        "diffusion_service",
        "prefill_service",
        "client",
        "protos",
        "gateway",
    },
    "transport": {"bagel", "serving", "step_cache", *SERVICES, "client", "gateway"},
    "step_cache": {"transport", "protos", *SERVICES, "client", "gateway"},
    "serving": {"torch", "bagel", "transport", *SERVICES, "client", "gateway"},
    "client": {"torch", "bagel", "transport", *SERVICES, "gateway"},
    "protos": {
        "torch",
        "bagel",
        "serving",
        "step_cache",
        "transport",
        *SERVICES,
        "client",
        "gateway",
    },
    "diffusion_service": {"prefill_service", "client", "gateway"},
    "prefill_service": {"diffusion_service", "client", "gateway"},
    "gateway": {"torch", "bagel", "transport", *SERVICES},
}


def product_modules() -> dict[str, Path]:
    """Module name -> file, for every product module except the generated protobuf stubs."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = product_modules()


def imported_names(module: str, path: Path) -> set[str]:
    """Every module `module` imports, at any depth of its code. `from X import y` imports the
    submodule `X.y` where there is one (Python loads it even while `X/__init__` is still
    running, so that is no cycle through `X`), otherwise `X`."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                names.add(submodule if submodule in MODULES else source)
    return names


def import_graph() -> dict[str, set[str]]:
    """Product module -> the product modules it imports."""
    return {
        module: {name for name in imported_names(module, path) if name in MODULES} - {module}
        for module, path in MODULES.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_product_packages_are_all_found_and_parsed():
    assert {m.split(".")[0] for m in MODULES} == set(PACKAGES)
    assert "serving.params" in MODULES and "protos.bagel.v1.params_pb2" not in MODULES
    assert "diffusion_service.parallel.config" in MODULES
    graph = import_graph()
    assert "serving.codecs" in graph["serving.params"]


def test_no_import_cycle_between_product_modules():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()) or [])


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    source = "def late():\n    from serving.params import GenerationParams\n"
    tree_names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            tree_names.add(node.module)
    assert tree_names == {"serving.params"}  # ast.walk reaches inside function bodies


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_each_package_imports_only_what_its_layer_allows(package):
    offending = sorted(
        f"{module} imports {name}"
        for module, path in MODULES.items()
        if module.split(".")[0] == package
        for name in imported_names(module, path)
        if name.split(".")[0] in FORBIDDEN[package]
    )
    assert offending == []


# The step-cache modules the request schema loads: plain Python, no torch, no model. Only the
# runtime (`store`, `collective`) touches tensors.
STEP_CACHE_RUNTIME = {"step_cache.store", "step_cache.collective"}


def test_the_step_cache_schema_side_imports_no_torch_and_only_the_schema_toolkit():
    offending = sorted(
        f"{module} imports {name}"
        for module, path in MODULES.items()
        if module.split(".")[0] == "step_cache" and module not in STEP_CACHE_RUNTIME
        for name in imported_names(module, path)
        if name.split(".")[0] in ("torch", "bagel")
        or (
            name.split(".")[0] == "serving"
            and name not in ("serving", "serving.codecs", "serving.errors")
        )
    )
    assert offending == []


def _in_fresh_interpreter(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_importing_transport_loads_no_bagel_module():
    run = _in_fresh_interpreter(
        "import sys, transport; "
        "bad = [m for m in sys.modules if m.split('.')[0] == 'bagel']; "
        "assert not bad, bad"
    )
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("first", ["step_cache", "serving", "step_cache.policies.dbcache"])
def test_the_step_cache_policies_and_the_schema_load_in_either_order_without_torch(first):
    run = _in_fresh_interpreter(
        f"import sys, {first}, serving.params, step_cache; "
        "assert list(step_cache.POLICIES) == ['none', 'tea_cache', 'db_cache'], step_cache.POLICIES; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'bagel')]; "
        "assert not bad, sorted(bad)[:5]"
    )
    assert run.returncode == 0, run.stderr


def test_importing_serving_client_and_gateway_loads_neither_torch_nor_bagel():
    run = _in_fresh_interpreter(
        "import sys, serving, client, client.cli, gateway.app, gateway.__main__; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'bagel', 'transport')]; "
        "assert not bad, sorted(bad)[:5]"
    )
    assert run.returncode == 0, run.stderr


def test_the_services_never_load_the_in_process_reference_pipeline():
    """`bagel.pipeline` is the reference the services are checked against, not a part of them."""
    run = _in_fresh_interpreter(
        "import sys, diffusion_service.server, prefill_service.server, prefill_service.mock; "
        "assert 'bagel.pipeline' not in sys.modules"
    )
    assert run.returncode == 0, run.stderr


def test_environment_switches_are_read_only_through_their_declarations():
    """Every `os.environ` read of the model goes through `bagel.envs`, where each switch is
    declared and documented, and every declared switch is in its table."""
    from bagel import envs

    readers = [
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "bagel").rglob("*.py")
        if "os.environ" in path.read_text() or "getenv" in path.read_text()
    ]
    assert readers == ["bagel/envs.py"]
    for name in envs.SWITCHES:
        assert f"`{name}`" in envs.__doc__, name


def test_the_branch_enum_is_numbered_as_the_wire_context_kind():
    """`bagel.network.kv.Branch` and `bagel.v1.ContextKind` name the same CFG contexts with the same
    numbers, so the transport's context kinds convert with `Branch(kind)` and back with `int`."""
    from bagel.network.kv import Branch
    from protos import kv_pb2

    wire = {
        name.removeprefix("CONTEXT_KIND_"): number
        for name, number in kv_pb2.ContextKind.items()
        if number != kv_pb2.CONTEXT_KIND_UNSPECIFIED
    }
    assert {b.name: int(b) for b in Branch} == wire


# Inside `bagel`: subpackage (or top-level module) -> what else of `bagel` it may import. Each
# layer builds on the ones above it; `pipeline` may use them all and `testing` is a leaf.
BASE = {"envs", "devices"}
BAGEL_LAYERS = {
    "envs": set(),
    "devices": set(),
    "kernels": BASE,
    "network": BASE | {"kernels"},
    "checkpoints": BASE | {"kernels", "network"},
    "text": BASE | {"kernels", "network"},
    "diffusion": BASE | {"kernels", "network"},
    "prompting": BASE | {"kernels", "network", "text"},
    "pipeline": BASE | {"kernels", "network", "checkpoints", "text", "diffusion", "prompting"},
    "testing": BASE | {"kernels", "network", "checkpoints", "text"},
}


def bagel_layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "bagel" and len(parts) > 1 else None


def test_every_bagel_module_belongs_to_a_layer():
    layers = {bagel_layer(m) for m in MODULES if m.startswith("bagel.")}
    assert layers == set(BAGEL_LAYERS)


def test_each_bagel_layer_imports_only_the_layers_above_it():
    offending = sorted(
        f"{module} imports {name}"
        for module, path in MODULES.items()
        if (layer := bagel_layer(module)) is not None
        for name in imported_names(module, path)
        if (other := bagel_layer(name)) is not None
        and other != layer
        and other not in BAGEL_LAYERS[layer]
    )
    assert offending == []


def test_no_product_module_imports_the_checkpoint_fixtures():
    """`bagel.testing` writes random checkpoints for tests, examples and benchmarks; the services
    and the model never need it."""
    offending = sorted(
        f"{module} imports {name}"
        for module, path in MODULES.items()
        if bagel_layer(module) != "testing"
        for name in imported_names(module, path)
        if bagel_layer(name) == "testing"
    )
    assert offending == []
