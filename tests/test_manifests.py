"""The manifests in inferenceservices/ are what a KServe cluster accepts and what the predictor expects.

There is no cluster here. Each resource is validated against its CRD schema (inferenceservices/schemas/), made strict so
that an unknown key fails (the API server would prune it silently), plus what KServe's webhook checks and a schema
cannot. Each pod is built the way KServe builds it (inferenceservices/expand.py) and checked against the predictor's
own argument parser, the variants table in predictor/variants.py and, with the tiny server, its real routes.
The checks live in manifest_checks.py; every one is also shown to fail on a drifted copy.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import yaml
from manifest_checks import (
    MANIFESTS,
    Doc,
    adapter_problems,
    all_problems,
    expand,
    kserve_container,
    kserve_problems,
    pod_of,
    route_problems,
    schema_problems,
)

from predictor.api.chat.schema import parse_chat_request
from predictor.variants import VARIANTS

PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def load_docs(paths: list[Path]) -> list[Doc]:
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def resource_files() -> list[Path]:
    """Every file of Kubernetes resources in inferenceservices/: what a kustomization lists as its resources (its
    patches are fragments, checked once kustomize has applied them)."""
    files = set()
    for kustomization in MANIFESTS.rglob("kustomization.yaml"):
        for entry in yaml.safe_load(kustomization.read_text()).get("resources", []):
            if (kustomization.parent / entry).is_file():
                files.add((kustomization.parent / entry).resolve())
    return sorted(files)


def base_files() -> list[Path]:
    return sorted(p for p in (MANIFESTS / "base").glob("*.yaml") if p.name != "kustomization.yaml")


def kustomize(directory: Path) -> list[Doc]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d.get("kind") == kind]


def named(docs: list[Doc], name: str) -> Doc:
    return next(d for d in docs if d["metadata"]["name"] == name)


@pytest.fixture
def docs() -> list[Doc]:
    """The base set, freshly loaded: tests may change it."""
    return load_docs(base_files())


# ---- the resource schemas -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", resource_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_every_resource_validates_against_its_strict_schema(path: Path) -> None:
    for doc in load_docs([path]):
        assert schema_problems(doc) == []


def test_the_explicit_container_form_validates_too(docs: list[Doc]) -> None:
    explicit = expand.expand(docs)
    assert of_kind(explicit, "InferenceService") and not of_kind(explicit, "ServingRuntime")
    for doc in explicit:
        assert schema_problems(doc) == []


TYPOS: dict[str, tuple[str, str, Callable[[list[Doc]], None]]] = {
    # name: (resource, the misspelt key, change)
    "pod field": ("falcon-7b", "nodeSelecter", lambda d: named(d, "falcon-7b")["spec"]["predictor"].update(
        nodeSelecter={})),
    "resources": ("falcon-40b", "limit", lambda d: named(d, "falcon-40b")["spec"]["predictor"]["model"]
                  ["resources"].update(limit={"nvidia.com/gpu": 2})),
    "probe": ("falcon-predictor", "paht", lambda d: named(d, "falcon-predictor")["spec"]["containers"][0]
              ["readinessProbe"]["httpGet"].update(paht="/health")),
    "route": ("falcon-chat", "timeout", lambda d: named(d, "falcon-chat")["spec"]["rules"][0].update(
        timeout={"request": "1s"})),
    "metadata": ("falcon-7b", "anotations", lambda d: named(d, "falcon-7b")["metadata"].update(anotations={})),
}


@pytest.mark.parametrize("typo", TYPOS, ids=list(TYPOS))
def test_a_typo_fails_validation(docs: list[Doc], typo: str) -> None:
    name, key, mutate = TYPOS[typo]
    mutate(docs)
    problems = schema_problems(named(docs, name))
    assert any(key in problem for problem in problems), problems


def test_an_unknown_kind_fails_validation() -> None:
    assert schema_problems({"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceServise",
                            "metadata": {"name": "x"}}) == ["no schema for serving.kserve.io/v1beta1 InferenceServise"]


# ---- what KServe's webhook checks -----------------------------------------------------------------------------------

def test_kserve_accepts_every_inferenceservice(docs: list[Doc]) -> None:
    for isvc in of_kind(docs, "InferenceService"):
        assert kserve_problems(isvc, docs) == []


def _rename_runtime_container(d: list[Doc]) -> None:
    named(d, "falcon-predictor")["spec"]["containers"][0]["name"] = "predictor"


def _rename_explicit_container(d: list[Doc]) -> None:
    isvc = named(d, "falcon-7b")
    isvc["spec"]["predictor"] = pod_of(isvc, d)  # the explicit form: containers instead of model
    isvc["spec"]["predictor"]["containers"][0]["name"] = "main"


WEBHOOK_FAULTS: dict[str, tuple[str, Callable[[list[Doc]], None]]] = {
    "no modelFormat": ("modelFormat", lambda d: named(d, "falcon-7b")["spec"]["predictor"]["model"].pop(
        "modelFormat")),
    "runtime container renamed": ("kserve-container", _rename_runtime_container),
    "explicit container renamed": ("kserve-container", _rename_explicit_container),
    "unknown runtime": ("no ServingRuntime", lambda d: named(d, "falcon-7b")["spec"]["predictor"]["model"].update(
        runtime="falcon")),
    "no deployment mode": ("deploymentMode", lambda d: named(d, "falcon-7b")["metadata"].pop("annotations")),
}


@pytest.mark.parametrize("fault", WEBHOOK_FAULTS, ids=list(WEBHOOK_FAULTS))
def test_kserve_checks_the_schema_cannot_make(docs: list[Doc], fault: str) -> None:
    expected, mutate = WEBHOOK_FAULTS[fault]
    mutate(docs)
    assert any(expected in problem for problem in kserve_problems(named(docs, "falcon-7b"), docs))


# ---- what the predictor expects, against the variants table ---------------------------------------------------------

def test_each_variant_is_deployed_once(docs: list[Doc]) -> None:
    assert sorted(i["metadata"]["name"] for i in of_kind(docs, "InferenceService")) == sorted(VARIANTS)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_pod_agrees_with_the_predictor_and_the_variants_table(docs: list[Doc], name: str) -> None:
    assert all_problems(named(docs, name), docs) == []


def _model(name: str) -> Callable[[list[Doc]], dict[str, Any]]:
    return lambda d: named(d, name)["spec"]["predictor"]["model"]


def _runtime_container(d: list[Doc]) -> dict[str, Any]:
    return named(d, "falcon-predictor")["spec"]["containers"][0]


DRIFTS: dict[str, tuple[str, str, Callable[[list[Doc]], None]]] = {
    # name: (InferenceService checked, words in the problem, change)
    "gpu count": ("falcon-40b", "nvidia.com/gpu", lambda d: _model("falcon-40b")(d)["resources"]["limits"].update(
        {"nvidia.com/gpu": "1"})),
    "memory": ("falcon-7b", "memory request", lambda d: _model("falcon-7b")(d)["resources"]["requests"].update(
        memory="8Gi")),
    "shm not in the limit": ("falcon-40b", "memory limit", lambda d: _model("falcon-40b")(d)["resources"]["limits"]
                             .update(memory="90Gi")),
    "no /dev/shm": ("falcon-40b", "/dev/shm", lambda d: _model("falcon-40b")(d).pop("volumeMounts")),
    "revision": ("falcon-7b", "pinned revision", lambda d: _model("falcon-7b")(d).update(
        storageUri="hf://tiiuae/falcon-7b")),
    "model name": ("falcon-7b", "not one of", lambda d: _model("falcon-7b")(d).update(
        args=["--model_name=falcon-180b"])),
    "stale batch": ("falcon-40b", "--max_batch_size 16 but 2 x 80 GB hold 257", lambda d: _model("falcon-40b")(d)
                    ["args"].__setitem__(-1, "--max_batch_size=16")),
    "40B on one rank": ("falcon-40b", "--tensor_parallel_size 1 but falcon-40b runs on 2 GPU(s)", lambda d: _model(
        "falcon-40b")(d)["args"].remove("--tensor_parallel_size=2")),
    "flag typo": ("falcon-40b", "not a flag", lambda d: _model("falcon-40b")(d)["args"].append("--max_batch=4")),
    "bad value": ("falcon-7b", "rejects", lambda d: _model("falcon-7b")(d)["args"].append("--dtype=int8")),
    "probe port": ("falcon-7b", "not the server's --http_port", lambda d: _runtime_container(d)["readinessProbe"]
                   ["httpGet"].update(port=8081)),
    "startup budget": ("falcon-40b", "startupProbe", lambda d: _runtime_container(d)["startupProbe"].update(
        failureThreshold=30)),
    "liveness on readiness": ("falcon-7b", "livenessProbe", lambda d: _runtime_container(d)["livenessProbe"]
                              ["httpGet"].update(path="/health")),
    "grace period": ("falcon-7b", "terminationGracePeriodSeconds", lambda d: named(d, "falcon-7b")["spec"]
                     ["predictor"].update(terminationGracePeriodSeconds=30)),
    "no time to exit": ("falcon-40b", "to exit after its drain", lambda d: named(d, "falcon-40b")["spec"]
                        ["predictor"].update(terminationGracePeriodSeconds=10 + 660)),
    "gateway timeout": ("falcon-40b", "cuts requests", lambda d: named(d, "falcon-40b")["spec"]["predictor"].update(
        timeout=60)),
    "writable root": ("falcon-7b", "readOnlyRootFilesystem", lambda d: _runtime_container(d)["securityContext"]
                      .update(readOnlyRootFilesystem=False)),
}


@pytest.mark.parametrize("drift", DRIFTS, ids=list(DRIFTS))
def test_drift_is_reported(docs: list[Doc], drift: str) -> None:
    name, expected, mutate = DRIFTS[drift]
    mutate(docs)
    problems = all_problems(named(docs, name), docs)
    assert any(expected in problem for problem in problems), problems


def test_a_drifted_variants_table_is_reported(docs: list[Doc], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(VARIANTS, "falcon-7b", dataclasses.replace(VARIANTS["falcon-7b"], gpus=2))
    assert any("nvidia.com/gpu" in problem for problem in all_problems(named(docs, "falcon-7b"), docs))


# ---- the routes ----------------------------------------------------------------------------------------------------

def test_the_gateway_route_sends_each_model_to_its_predictor(docs: list[Doc]) -> None:
    assert route_problems(named(docs, "falcon-chat"), of_kind(docs, "InferenceService")) == []


def test_a_route_without_its_model_is_reported(docs: list[Doc]) -> None:
    isvcs = [i for i in of_kind(docs, "InferenceService") if i["metadata"]["name"] != "falcon-40b"]
    assert route_problems(named(docs, "falcon-chat"), isvcs) == [
        "backend falcon-40b-predictor is no InferenceService's predictor"]


# ---- kustomize and the explicit form --------------------------------------------------------------------------------

def test_kustomize_renders_the_set() -> None:
    rendered = kustomize(MANIFESTS)
    assert sorted(d["kind"] for d in rendered) == ["HTTPRoute"] + ["InferenceService"] * 4 + ["ServingRuntime"]
    base = yaml.safe_load((MANIFESTS / "base" / "kustomization.yaml").read_text())
    image = f"{base['images'][0]['newName']}:{base['images'][0]['newTag']}"
    assert [c["image"] for c in of_kind(rendered, "ServingRuntime")[0]["spec"]["containers"]] == [image]
    for doc in rendered:
        assert schema_problems(doc) == []
    for isvc in of_kind(rendered, "InferenceService"):
        assert all_problems(isvc, rendered) == []
    assert route_problems(of_kind(rendered, "HTTPRoute")[0], of_kind(rendered, "InferenceService")) == []


def test_kustomize_renders_the_pvc_overlay() -> None:
    rendered = kustomize(MANIFESTS / "pvc")
    for isvc in of_kind(rendered, "InferenceService"):
        model = isvc["spec"]["predictor"]["model"]
        assert model["storageUri"] == f"pvc://falcon-models/{isvc['metadata']['name']}"
        assert "ephemeral-storage" not in model["resources"]["requests"]  # nothing is downloaded
        assert schema_problems(isvc) == [] and all_problems(isvc, rendered) == []


def test_kustomize_renders_the_adapters_overlay() -> None:
    rendered = kustomize(MANIFESTS / "adapters")
    isvc = named(of_kind(rendered, "InferenceService"), "falcon-7b")
    predictor = isvc["spec"]["predictor"]
    assert "storageUri" not in predictor["model"]
    assert [entry["mountPath"] for entry in predictor["storageUris"]] == ["/mnt/models", "/mnt/lora/sql",
                                                                          "/mnt/lora/support"]
    for doc in rendered:
        assert schema_problems(doc) == []
    assert all_problems(isvc, rendered) == [] and adapter_problems(isvc, rendered) == []


@pytest.mark.parametrize("drift, words", [
    ("unmounted", "adapter sql: /mnt/lora/other is not the mount path"),
    ("twice", "mount path /mnt/lora/sql is used twice"),
    ("both", "cannot both be set"),
])
def test_adapter_drift_is_reported(drift: str, words: str) -> None:
    rendered = kustomize(MANIFESTS / "adapters")
    isvc = named(of_kind(rendered, "InferenceService"), "falcon-7b")
    predictor = isvc["spec"]["predictor"]
    if drift == "unmounted":
        args = predictor["model"]["args"]
        args[args.index("sql=/mnt/lora/sql")] = "sql=/mnt/lora/other"
    elif drift == "twice":
        predictor["storageUris"][2]["mountPath"] = "/mnt/lora/sql"
    else:
        predictor["model"]["storageUri"] = predictor["storageUris"][0]["uri"]
    assert any(words in problem for problem in adapter_problems(isvc, rendered))


def test_kustomize_renders_falcon_40b_drafted_by_falcon_7b() -> None:
    from manifest_checks import parse_args
    rendered = kustomize(MANIFESTS / "speculative")
    isvc = named(of_kind(rendered, "InferenceService"), "falcon-40b")
    predictor = isvc["spec"]["predictor"]
    config, problems = parse_args(predictor["model"]["args"])
    assert problems == [] and config.speculative.method == "draft_model" and config.speculative.model == "/mnt/draft"
    assert [entry["uri"] for entry in predictor["storageUris"]] == [VARIANTS["falcon-40b"].hf_uri,
                                                                    VARIANTS["falcon-7b"].hf_uri]
    for doc in rendered:
        assert schema_problems(doc) == []
    assert all_problems(isvc, rendered) == [] and adapter_problems(isvc, rendered) == []
    predictor["storageUris"][1]["mountPath"] = "/mnt/other"  # the draft is fetched where the server does not look
    assert any("draft model: /mnt/draft" in problem for problem in adapter_problems(isvc, rendered))


def test_kustomize_renders_falcon_40b_on_one_gpu_in_fp8() -> None:
    rendered = kustomize(MANIFESTS / "fp8")
    isvc = named(of_kind(rendered, "InferenceService"), "falcon-40b")
    model = isvc["spec"]["predictor"]["model"]
    assert "--quantization=fp8" in model["args"] and model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for doc in rendered:
        assert schema_problems(doc) == []
    assert all_problems(isvc, rendered) == []
    model["args"].remove("--quantization=fp8")  # bf16 weights on one GPU: the checks see it does not fit
    assert any("needs 2" in problem for problem in all_problems(isvc, rendered))


def test_expand_prints_the_explicit_form_of_each_inferenceservice(docs: list[Doc]) -> None:
    out = subprocess.run([sys.executable, str(MANIFESTS / "expand.py"), *map(str, base_files())],
                         capture_output=True, text=True, check=True).stdout
    explicit = [d for d in yaml.safe_load_all(out) if d]
    runtime = _runtime_container(docs)
    for isvc in of_kind(explicit, "InferenceService"):
        predictor, model = isvc["spec"]["predictor"], _model(isvc["metadata"]["name"])(docs)
        container = kserve_container(predictor)
        assert "model" not in predictor and container["args"] == runtime["args"] + model["args"]
        assert {"name": "STORAGE_URI", "value": model["storageUri"]} in container["env"]
        assert all_problems(isvc, explicit) == []


# ---- the deployment README ------------------------------------------------------------------------------------------

README = MANIFESTS / "README.md"


def readme_payload() -> dict[str, Any]:
    """The body of the README's curl example (a <<'EOF' heredoc)."""
    payload = re.search(r"<<'EOF'\n(.*?)\nEOF\n", README.read_text(), re.S)
    assert payload, "the README's curl example reads its body from a <<'EOF' heredoc"
    return json.loads(payload.group(1))


def test_readme_curl_payload_is_a_valid_chat_request() -> None:
    parse_chat_request(readme_payload())


def test_readme_gpu_table_matches_the_variants() -> None:
    rows = {m[1]: int(m[2]) for m in re.finditer(r"^\| `?(falcon-[\w-]+)`? \| (\d+) ", README.read_text(), re.M)}
    assert rows == {v.name: v.gpus for v in VARIANTS.values()}


# ---- against the running server -------------------------------------------------------------------------------------

def unserved_probe_paths(server: Any, docs: list[Doc]) -> list[str]:
    """Probe paths of every pod that the server does not answer 200 (its own model name put for the manifest's)."""
    problems = []
    for isvc in of_kind(docs, "InferenceService"):
        name, container = isvc["metadata"]["name"], kserve_container(pod_of(isvc, docs))
        for kind in PROBES:
            path = container[kind]["httpGet"]["path"]
            served = "/".join(server.model_name if part == name else part for part in path.split("/"))
            status = httpx.get(server.url + served, timeout=10).status_code
            if status != 200:
                problems.append(f"{name} {kind} {path}: {status}")
    return problems


def test_probe_paths_are_routes_the_server_serves(tiny_server: Any, docs: list[Doc]) -> None:
    assert unserved_probe_paths(tiny_server, docs) == []


def test_a_probe_path_the_server_does_not_serve_is_reported(tiny_server: Any, docs: list[Doc]) -> None:
    _runtime_container(docs)["readinessProbe"]["httpGet"]["path"] = "/ready"
    model_path = "/v1/models/falcon-40b"  # a path naming the model is checked under the served name
    _model("falcon-40b")(docs)["livenessProbe"] = {"httpGet": {"path": model_path, "port": 8080}}
    problems = unserved_probe_paths(tiny_server, docs)
    assert len([p for p in problems if "readinessProbe /ready: 404" in p]) == 4
    assert not any(model_path in p for p in problems)


def test_the_route_rewrite_target_takes_the_readme_payload(tiny_server: Any, docs: list[Doc]) -> None:
    rewrites = {f["urlRewrite"]["path"]["replaceFullPath"] for rule in named(docs, "falcon-chat")["spec"]["rules"]
                for f in rule["filters"]}
    payload = readme_payload()
    payload["generate_kwargs"]["max_length"] = 48  # the tiny model on a CPU takes ~10 s for the full 200 tokens
    for path in rewrites:
        response = httpx.post(tiny_server.url + path, json=payload, timeout=120)
        assert response.status_code == 200, response.text


# ---- weights in OCI images (modelcar/) ------------------------------------------------------------------------------

def test_kustomize_renders_the_modelcar_overlay() -> None:
    rendered = kustomize(MANIFESTS / "modelcar")
    isvcs = of_kind(rendered, "InferenceService")
    assert sorted(i["metadata"]["name"] for i in isvcs) == sorted(VARIANTS)
    for isvc in isvcs:
        model, variant = isvc["spec"]["predictor"]["model"], VARIANTS[isvc["metadata"]["name"]]
        assert model["storageUri"].startswith("oci://") and model["storageUri"].endswith(
            f"/{variant.name}:{variant.revision}")
        assert "ephemeral-storage" not in model["resources"]["requests"]  # the image is on the node, not the pod
        assert schema_problems(isvc) == [] and all_problems(isvc, rendered) == []


@pytest.mark.parametrize("uri, words", [
    ("oci://registry.example.com/falcon-weights/falcon-7b:latest", "not the pinned revision"),
    ("oci://registry.example.com/falcon-weights/falcon-7b", "needs a tag"),
    ("oci://registry.example.com/falcon-weights/falcon-40b:898df1396f35e447d5fe44e0a3ccaaaa69f30d36", "model's"),
])
def test_a_modelcar_that_does_not_say_its_checkpoint_is_reported(uri: str, words: str) -> None:
    rendered = kustomize(MANIFESTS / "modelcar")
    isvc = named(rendered, "falcon-7b")
    isvc["spec"]["predictor"]["model"]["storageUri"] = uri
    assert any(words in problem for problem in all_problems(isvc, rendered))


def test_the_modelcar_recipe_puts_the_checkpoint_where_kserve_looks() -> None:
    """KServe's modelcar sidecar links the image's /models into the pod with a shell command: the image needs a
    shell and the checkpoint at /models, readable by the predictor's user."""
    lines = [line.split() for line in (MANIFESTS / "modelcar" / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0][0] == "FROM" and lines[0][1].startswith("busybox:")
    copy_line = next(words for words in lines if words[0] == "COPY")
    assert copy_line[-1] == "/models/" and "--chmod=a+rX" in copy_line
    assert ["USER", "1000:1000"] in lines
