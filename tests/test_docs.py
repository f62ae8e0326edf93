"""The documentation against the code: generated parts current, links and file references resolving, flags that
exist, figures about the variants from ``predictor/variants.py``, notebooks naming only routes and finish reasons
the server has. No server and no model: the routes come from the app the server builds, unstarted."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from fastapi import FastAPI
from starlette.routing import Match

from predictor.config import KSERVE_REFUSED_FLAGS, KSERVE_TRANSFORMER_FLAGS, add_predictor_arguments, build_parser
from predictor.engine.scheduling.tickets import FINISH_REASONS
from predictor.engine.quantization.schemes import BYTES_PER_WEIGHT
from predictor.variants import KV_BYTES_PER_HEAD, VARIANTS

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "inferenceservices" / "README.md",
               ROOT / "benchmarks" / "README.md"])
USER_DOCS = [path for path in DOCS if path.parent.name != "benchmarks"]  # benchmarks/ documents its scripts' flags
MANIFEST_FILES = sorted((ROOT / "inferenceservices").rglob("*.yaml"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
FILE_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".json", ".ipynb", ".sh", ".toml")
# Where a relative file name in a document may start, besides the document's own folder
REFERENCE_ROOTS = (ROOT, ROOT / "inferenceservices", ROOT / "predictor", ROOT / "predictor" / "api",
                   ROOT / "predictor" / "engine")
# Other programs' flags the documents name, beside this server's
FOREIGN_FLAGS = {
    "--served-model-name": "vLLM's flag, which --model_alias mirrors",
    "--index-url": "pip's, for the CPU build of torch",
}


def load_generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def prose(text: str) -> str:
    """Markdown without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def inline_code(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", prose(text))


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    headings = re.findall(r"^#+ (.+)$", prose(path.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def help_flags() -> set[str]:
    parser = build_parser()
    return {flag for flag, action in parser._option_string_actions.items() if action.help != argparse.SUPPRESS}


# ---- generated documentation --------------------------------------------------------------------------------------

def test_the_generated_documentation_is_current(capsys) -> None:
    """docs/configuration.md and the variants tables are what docs/generate.py writes from the parser, the manifests
    and variants.py: a new flag, a changed default or manifest value, a changed variant needs a regeneration."""
    assert load_generator().main(["--check"]) == 0, capsys.readouterr().err


def test_the_check_notices_a_stale_file(tmp_path, monkeypatch) -> None:
    generator = load_generator()
    stale = tmp_path / "configuration.md"
    stale.write_text(generator.configuration_md().replace("`--max_queue` | `128`", "`--max_queue` | `64`"))
    monkeypatch.setattr(generator, "CONFIGURATION", stale)
    assert generator.main(["--check"]) == 1


def test_the_reference_shows_each_flag_with_its_default_and_the_manifests_value() -> None:
    reference = (ROOT / "docs" / "configuration.md").read_text()
    assert "| `--request_timeout` | `300.0` | `600` | `600` |" in reference
    assert "| `--drain_timeout` | `60.0` | `660` | `660` |" in reference
    assert "| `--http_port` | `8080` | `8080` | `8000` |" in reference
    assert "falcon-40b, falcon-40b-instruct: `2`" in reference  # --tensor_parallel_size, 40B only


def test_every_flag_of_ours_is_in_the_reference() -> None:
    ours = argparse.ArgumentParser()
    add_predictor_arguments(ours)
    reference = (ROOT / "docs" / "configuration.md").read_text()
    flags = [flag for action in ours._actions if action.dest != "help" for flag in action.option_strings]
    assert len(flags) > 20
    assert [flag for flag in flags if f"`{flag}`" not in reference] == []


def test_the_kserve_flags_that_do_nothing_are_listed_as_such() -> None:
    reference = (ROOT / "docs" / "configuration.md").read_text()
    hidden = reference[reference.index("## KServe's flags that do nothing here"):]
    assert all(f"`{flag}`" in hidden for flag in KSERVE_TRANSFORMER_FLAGS + KSERVE_REFUSED_FLAGS)
    assert "8081" in reference  # gRPC's port, said whether or not gRPC is on


# ---- links, files and flags the documents name ---------------------------------------------------------------------

@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(doc.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (doc.parent / file).resolve() if file else doc
        if not linked.exists():
            broken.append(target)
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_files_and_folders_named_in_prose_exist(doc: Path) -> None:
    """A `path/to/file.py` or `folder/` in a document's text is in the repository (from the repository root, the
    document's folder, or the package)."""
    missing = []
    for span in inline_code(doc.read_text()):
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)*/?", span) or "/" not in span:
            continue
        if not (span.endswith("/") or span.endswith(FILE_SUFFIXES)):
            continue  # a Hugging Face id, an API group, a label: not a file
        if not any((base / span).exists() for base in (doc.parent, *REFERENCE_ROOTS)):
            missing.append(span)
    assert missing == []


def test_the_file_check_catches_a_file_that_is_not_there(tmp_path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("See `predictor/engine.py` and `benchmarks/results/gpu-h200.json`.\n")
    with pytest.raises(AssertionError):
        test_files_and_folders_named_in_prose_exist(doc)


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_flag_a_document_names_is_in_help(doc: Path) -> None:
    """In prose (`--flag`, `--flag=value`, `--flag value`) and in the `python -m predictor` lines of code blocks.
    KServe's flags that do nothing here are named only by the configuration reference, which says so."""
    text = doc.read_text()
    named = {match for span in inline_code(text) if span.startswith("--")
             for match in re.findall(r"^--[A-Za-z][\w-]*", span)}
    for line in re.findall(r"python -m predictor([^\n]*)", text):
        named |= set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", line))
    allowed = help_flags() | set(FOREIGN_FLAGS)
    if doc.name == "configuration.md":
        allowed |= set(KSERVE_TRANSFORMER_FLAGS + KSERVE_REFUSED_FLAGS)
    assert sorted(named - allowed) == []


def test_the_flag_check_catches_a_flag_that_is_gone(tmp_path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("Start it with `--max_batch_size 8` and `--workers 4`.\n")
    with pytest.raises(AssertionError):
        test_every_flag_a_document_names_is_in_help(doc)


# ---- figures about the variants --------------------------------------------------------------------------------

def figure_texts() -> dict[str, str]:
    """Every user document, and the comments of every manifest."""
    texts = {str(path.relative_to(ROOT)): path.read_text() for path in USER_DOCS}
    for path in MANIFEST_FILES:
        comments = re.findall(r"#(.*)$", path.read_text(), re.M)
        texts[str(path.relative_to(ROOT))] = " ".join(" ".join(comment.split()) for comment in comments)
    return texts


def test_rows_per_replica_agree_with_the_variants() -> None:
    """`~N sequences` and `hold(s) ~N`: the default cache's full-length rows on the GPUs named."""
    known = {variant.rows_on(variant.gpus, gpu_gb) for variant in VARIANTS.values() for gpu_gb in (24, 80)
             if gpu_gb >= variant.gpu_gb}
    # quantized: a variant's weights in a scheme, its cache in a dtype, on one GPU or its usual count
    known |= {variant.rows_on(gpus, variant.gpu_gb, scheme, kv_cache_dtype) for variant in VARIANTS.values()
              for gpus in {1, variant.gpus} for scheme in BYTES_PER_WEIGHT for kv_cache_dtype in KV_BYTES_PER_HEAD}
    known.discard(0)
    wrong = []
    for name, text in figure_texts().items():
        text = " ".join(text.split())
        figures = re.findall(r"~(\d[\d,]*) (?:full [\d,-]+token )?sequences", text)
        figures += re.findall(r"holds? ~(\d[\d,]*)", text)
        wrong += [f"{name}: ~{figure}" for figure in figures if int(figure.replace(",", "")) not in known]
    assert wrong == [], f"rows per replica are {sorted(known)} (predictor/variants.py)"


def test_kv_bytes_and_weights_agree_with_the_variants() -> None:
    kib = {v.kv_bytes_per_token // 1024 for v in VARIANTS.values()} | {
        v.kv_bytes_per_token_per_gpu // 1024 for v in VARIANTS.values()} | {
        round(v.kv_bytes_per_token_in(dtype) / 1024) for v in VARIANTS.values() for dtype in KV_BYTES_PER_HEAD}
    weights = {f"{gb:.1f}" for v in VARIANTS.values() for gb in (v.weights_gb, v.weights_per_gpu_gb)} | {
        f"{v.weight_bytes(scheme) / 1e9:.1f}" for v in VARIANTS.values() for scheme in BYTES_PER_WEIGHT}
    wrong = []
    for name, text in figure_texts().items():
        text = " ".join(text.split())
        wrong += [f"{name}: {n} KiB per token" for n in re.findall(r"(\d+) KiB per token", text) if int(n) not in kib]
        wrong += [f"{name}: {gb} GB of weights" for gb in re.findall(r"(\d+\.\d) GB (?:of (?:bf16 )?weights|"
                                                                     r"of the weights|\(bf16\))", text)
                  if gb not in weights]
    assert wrong == []


def test_gpu_estimates_follow_the_tensor_parallel_layout() -> None:
    """The decode floors quoted are each GPU's read of its own weights, not 40B's whole weights on one GPU after
    another (the layer split that tensor parallelism replaced), and the speeds say they are estimates."""
    floors = {f"{variant.decode_floor_ms:.1f}" for variant in VARIANTS.values()}
    runtime = (ROOT / "inferenceservices" / "base" / "servingruntime.yaml").read_text()
    readme = (ROOT / "inferenceservices" / "README.md").read_text()
    for text in (runtime, readme):
        assert all(floor in text for floor in floors)
        assert "estimates" in text
    for name, text in figure_texts().items():
        assert "one GPU after the other" not in text and "27.5 ms" not in text, name


def test_the_gpus_the_root_set_needs_are_stated() -> None:
    words = {4: "four", 6: "six"}
    total = sum(variant.gpus for variant in VARIANTS.values())
    large = sum(variant.gpus for variant in VARIANTS.values() if variant.gpu_gb >= 80)
    statement = f"{words[total]} GPUs, {words[large]} of them 80 GB"
    for path in (ROOT / "README.md", ROOT / "inferenceservices" / "README.md"):
        assert statement in " ".join(path.read_text().split()), path


def test_every_overlay_is_in_the_folder_tables() -> None:
    readme = (ROOT / "inferenceservices" / "README.md").read_text()
    overlays = sorted(path.parent.name for path in (ROOT / "inferenceservices").glob("*/kustomization.yaml"))
    assert "adapters" in overlays
    for table in ("## Which folder", "The files:"):
        section = readme[readme.index(table):]
        assert [name for name in overlays if f"| `{name}/" not in section] == [], table


def test_every_place_that_names_the_image_is_in_the_checklist() -> None:
    checklist = (ROOT / "inferenceservices" / "README.md").read_text().split("## Deployment checklist")[1]
    checklist = " ".join(checklist.split("\n## ")[0].split())
    for path in (ROOT / "inferenceservices").glob("*/kustomization.yaml"):
        if "images" in (yaml.safe_load(path.read_text()) or {}):
            assert f"{path.parent.name}/kustomization.yaml" in checklist, path


def test_every_engine_room_and_api_protocol_is_in_the_architecture() -> None:
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    rooms = [path.parent for path in (ROOT / "predictor").glob("*/*/__init__.py")]
    assert len(rooms) >= 8
    assert [room.name for room in rooms if f"`{room.name}/`" not in architecture] == []


# ---- notebooks -------------------------------------------------------------------------------------------------

def served_app() -> FastAPI:
    """The app the server builds (``install``) with KServe's own routes (v1, v2) added as its REST server adds them;
    unstarted, its model unloaded."""
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
    from kserve.protocol.rest.v2_endpoints import register_v2_endpoints

    from predictor.api.model import FalconModel
    from predictor.api.server import install
    from predictor.config import parse_config

    app, config, registry = FastAPI(), parse_config([]), ModelRepository()
    install(app, FalconModel(config), config)
    app.add_api_route("/metrics", lambda: None, methods=["GET"])  # KServe's REST server adds it as it starts
    for register in (register_v1_endpoints, register_v2_endpoints):
        register(app, DataPlane(model_registry=registry), ModelRepositoryExtension(model_registry=registry))
    return app


def is_served(app: FastAPI, path: str) -> bool:
    """Whether a route of ``app`` answers ``path`` (with any method), or ``path`` is the prefix of routes (a
    client's base URL, ``/openai/v1``); a ``<name>`` or ``{name}`` stands for a name."""
    if any(served.startswith(path.rstrip("/") + "/") for served in app.openapi()["paths"]):
        return True
    path = re.sub(r"<[^>]*>|\{[^}]*\}", "falcon-7b", path)
    return any(route.matches({"type": "http", "path": path, "method": method, "root_path": ""})[0] != Match.NONE
               for route in app.routes for method in ("GET", "POST"))


def notebook_texts() -> dict[str, str]:
    return {f"{path.name} cell {number}": "".join(cell["source"])
            for path in NOTEBOOKS for number, cell in enumerate(json.loads(path.read_text())["cells"])
            if cell["cell_type"] == "markdown"}


def test_notebooks_name_only_routes_that_exist() -> None:
    app = served_app()
    named = {(where, path) for where, text in notebook_texts().items() for span in re.findall(r"`([^`]+)`", text)
             for path in re.findall(r"(?:^|(?:GET|POST) )(/[\w/{}<>:.-]*)", span)}
    assert len(named) >= 3
    assert sorted((where, path) for where, path in named
                  if not is_served(app, path)) == []


def test_the_route_check_knows_the_servers_routes() -> None:
    app = served_app()
    for path in ("/chat", "/health", "/livez", "/metrics", "/v1/chat/completions", "/openai/v1/models",
                 "/v2/models/<name>/infer", "/v1/models/falcon-7b:predict", "/v2/models/{name}/ready"):
        assert is_served(app, path), path
    assert is_served(app, "/openai/v1")  # a base URL
    assert not is_served(app, "/models") and not is_served(app, "/v1/generate")


def test_notebooks_and_docs_name_only_finish_reasons_that_exist() -> None:
    """Quoted finish reasons (`"stop"`) in the notebooks' texts, and the `...` list after "finish reason" in the
    documents. A notebook once promised "eos", which the server never answers (it says "stop")."""
    wrong = []
    for where, text in notebook_texts().items():
        if "finish_reason" in text or "stopped" in text:
            wrong += [(where, reason) for reason in re.findall(r'`"(\w+)"`', text) if reason not in FINISH_REASONS]
    for path in USER_DOCS:
        text = " ".join(prose(path.read_text()).split())
        for listed in re.findall(r"finish reason(?:s)? ?\(([^)]*)\)", text):
            wrong += [(path.name, reason) for reason in re.findall(r"`(\w+)`", listed) if reason not in FINISH_REASONS]
    assert wrong == []
