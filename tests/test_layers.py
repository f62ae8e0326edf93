"""The package's layers: the engine imports nothing of the HTTP side, and nothing lower imports anything higher."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "predictor"
HTTP_SIDE = ("kserve", "fastapi", "starlette", "pydantic", "uvicorn")
# What each layer may import of the project, lowest first. Top-level modules beside the two packages are shared
# leaves (errors, metrics, logs, variants, tiny, cpu_threads) or start-up (config, __main__), which sits above both.
ALLOWED = {
    "engine": {"predictor.engine", "predictor.errors", "predictor.metrics"},
    "api": {"predictor.api", "predictor.engine", "predictor.errors", "predictor.metrics", "predictor.logs",
            "predictor.config", "predictor.tiny", "predictor.variants", "predictor.cpu_threads"},
}


def project_imports(path: Path) -> set[str]:
    """Absolute names of the project modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = f"{base}.{node.module}" if base and node.module else base or node.module
            names |= {module} if node.module else {f"{module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return {name for name in names if name.startswith("predictor")}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_what_lies_below_it(layer: str) -> None:
    problems = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in project_imports(path):
            if not any(name == allowed or name.startswith(allowed + ".") for allowed in ALLOWED[layer]):
                problems.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not problems, problems


# Each wire protocol is a package of the API; none reaches into another's, except that the v2 protocol's parameters
# are /chat's options (it validates them with /chat's schema). The shared modules beside them (the kserve.Model,
# streaming, tracing, connections) import no protocol; server.py wires them all.
PROTOCOLS = {"chat": set(), "openai": set(), "v2": {"chat"}}


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_protocols_import_no_other_protocol(protocol: str) -> None:
    others = set(PROTOCOLS) - {protocol} - PROTOCOLS[protocol]
    problems = [f"{path.relative_to(PACKAGE)} imports {name}"
                for path in sorted((PACKAGE / "api" / protocol).glob("*.py")) for name in project_imports(path)
                if any(name.startswith(f"predictor.api.{other}.") or name == f"predictor.api.{other}"
                       for other in others)]
    assert (PACKAGE / "api" / protocol / "routes.py").exists()
    assert not problems, problems


def test_shared_api_modules_import_no_protocol_routes() -> None:
    problems = [f"{path.name} imports {name}" for path in sorted((PACKAGE / "api").glob("*.py"))
                if path.name != "server.py" for name in project_imports(path)
                if any(name.startswith(f"predictor.api.{protocol}.routes") for protocol in PROTOCOLS)]
    assert not problems, problems


# The engine's rooms, lowest first: each may import the engine's shared modules (options, faults, transfer) and
# the rooms before it, never one after it. Sampling knows nothing of the model; the model runs adapters but never
# schedules; quantized linears stand in for the model's (LoRA runs beside them); tensor parallelism wraps the model;
# scheduling drives whichever engine it is handed.
ENGINE_ROOMS = ("sampling", "lora", "quantization", "model", "parallel", "scheduling")
ENGINE_SHARED = ("options", "faults", "transfer")


def test_the_engine_is_grouped_by_concern() -> None:
    flat = sorted(p.stem for p in (PACKAGE / "engine").glob("*.py") if p.stem != "__init__")
    rooms = sorted(p.name for p in (PACKAGE / "engine").iterdir() if (p / "__init__.py").exists())
    assert flat == sorted(ENGINE_SHARED), f"engine modules outside a room: {set(flat) - set(ENGINE_SHARED)}"
    assert rooms == sorted(ENGINE_ROOMS)


@pytest.mark.parametrize("room", ENGINE_ROOMS)
def test_engine_rooms_import_only_rooms_below_them(room: str) -> None:
    above = ENGINE_ROOMS[ENGINE_ROOMS.index(room) + 1:]
    problems = [f"{path.relative_to(PACKAGE)} imports {name}"
                for path in sorted((PACKAGE / "engine" / room).rglob("*.py")) for name in project_imports(path)
                if any(name == f"predictor.engine.{other}" or name.startswith(f"predictor.engine.{other}.")
                       for other in above)]
    assert not problems, problems


def test_the_engines_shared_modules_import_no_room() -> None:
    problems = [f"{module}.py imports {name}" for module in ENGINE_SHARED
                for name in project_imports(PACKAGE / "engine" / f"{module}.py")
                if any(name.startswith(f"predictor.engine.{room}") for room in ENGINE_ROOMS)]
    assert not problems, problems


def test_the_engine_imports_nothing_of_the_http_side() -> None:
    modules = sorted(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
                     for p in (PACKAGE / "engine").rglob("*.py") if p.stem != "__init__")
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            f"print(','.join(m for m in {HTTP_SIDE!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert len(modules) >= 5
    assert loaded == "", f"importing the engine loaded {loaded}"


def test_relative_imports_are_resolved_to_module_names() -> None:
    probe = PACKAGE / "engine" / "scheduling" / "batcher.py"
    assert "predictor.engine.model.runner" in project_imports(probe)
    assert "predictor.errors" in project_imports(probe)
