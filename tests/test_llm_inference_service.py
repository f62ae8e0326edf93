"""inferenceservices/llm-inference-service/: KServe's LLMInferenceService running this server, offline.

The overlay renders with kustomize; each resource validates strictly against its CRD schema (inferenceservices/schemas);
each service merged with its preset, rendered in and out of KServe's TLS mode, validates against the LLMInferenceService
schema and meets KServe's contract (port 8000, /health, the publishers/... alias, weights in /mnt/models, the drain
inside the grace period) and this server's (its own argument parser, the variants table, the picker's metrics). Each
check is shown to report a drifted copy. The merge and templates are KServe's as ``llmisvc_checks`` reproduces them.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import yaml
from llmisvc_checks import llmisvc_problems, main_container, presets_of, render, workload_spec
from manifest_checks import MANIFESTS, Doc, schema_problems
from prometheus_client import REGISTRY, generate_latest
from scale_checks import epp_config, exported_families, with_kv_cache_metrics
from test_manifests import kustomize, named, of_kind

import predictor.metrics  # noqa: F401 - registers the server's metrics in the default registry
from predictor.variants import VARIANTS

OVERLAY = MANIFESTS / "llm-inference-service"


@pytest.fixture(scope="module")
def families() -> dict[str, str]:
    return with_kv_cache_metrics(exported_families(generate_latest(REGISTRY).decode()))


@pytest.fixture
def docs() -> list[Doc]:
    return kustomize(OVERLAY)


def test_the_overlay_renders_and_validates_strictly(docs: list[Doc]) -> None:
    assert sorted(d["kind"] for d in docs) == ["LLMInferenceService"] * 4 + ["LLMInferenceServiceConfig"]
    assert sorted(d["metadata"]["name"] for d in of_kind(docs, "LLMInferenceService")) == sorted(VARIANTS)
    for doc in docs:
        assert schema_problems(doc) == [], doc["metadata"]["name"]
    preset = of_kind(docs, "LLMInferenceServiceConfig")[0]
    assert main_container(preset["spec"])["image"] == "ghcr.io/example/falcon-predictor:0.1.0"  # kustomize's images


@pytest.mark.parametrize("tls", [False, True], ids=["http", "tls"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_service_meets_kserves_contract_and_the_servers(docs, families, name: str, tls: bool) -> None:
    assert llmisvc_problems(named(docs, name), docs, families, tls=tls) == []


def test_the_picker_maps_the_metrics_as_the_inference_pool_does(docs: list[Doc]) -> None:
    preset = presets_of(docs)["falcon-predictor"]
    inline = render(preset["spec"]["router"]["scheduler"]["config"]["inline"], "m", "ns", tls=False)
    pooled = epp_config(kustomize(MANIFESTS / "inference-pool"), "falcon-7b-instruct-epp")

    def without_source(config: Doc) -> Doc:  # the scrape's scheme differs: KServe's TLS mode scrapes HTTPS
        return {**config, "plugins": [p for p in config["plugins"] if p["type"] != "metrics-data-source"]}

    assert without_source(inline) == without_source(pooled)
    tls_inline = render(preset["spec"]["router"]["scheduler"]["config"]["inline"], "m", "ns", tls=True)
    assert tls_inline["plugins"][0] == {"type": "metrics-data-source", "parameters": {
        "scheme": "https", "path": "/metrics", "insecureSkipVerify": True}}


def test_the_merge_is_kserves_containers_by_name_args_replaced(docs: list[Doc]) -> None:
    spec = workload_spec(named(docs, "falcon-40b"), presets_of(docs))
    main = main_container(spec)
    # the service's, after the preset's command
    assert main["args"] == ["--dtype=bfloat16", "--tensor_parallel_size=2", "--max_batch_size=256"]
    assert main["command"][0] == "/bin/sh" and main["livenessProbe"]["httpGet"]["path"] == "/livez"
    shm = next(v for v in spec["template"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}  # the service's size over the preset's


def _preset(docs: list[Doc]) -> Doc:
    return presets_of(docs)["falcon-predictor"]["spec"]


def _script(docs: list[Doc], old: str, new: str) -> None:
    command = main_container(_preset(docs))["command"]
    assert old in command[2]
    command[2] = command[2].replace(old, new)


def _engine(docs: list[Doc]) -> Doc:
    plugins = _preset(docs)["router"]["scheduler"]["config"]["inline"]["plugins"]
    return next(p for p in plugins if p["type"] == "core-metrics-extractor")["parameters"]["engineConfigs"][0]


DRIFTS: dict[str, tuple[str, Callable[[list[Doc]], None]]] = {
    # name: (words in the problem, change) - checked on falcon-40b in TLS mode
    "no alias": ("--model_alias", lambda d: _script(
        d, "--model_alias=publishers/{{ .ObjectMeta.Namespace }}/models/{{ .Spec.Model.Name }}", "")),
    "another port": ("8000", lambda d: _script(d, "--http_port=8000", "--http_port=8080")),
    "vLLM's command": ("command", lambda d: main_container(_preset(d)).pop("command")),
    "no TLS flags": ("--ssl_certfile", lambda d: _script(
        d, "--ssl_certfile=/var/run/kserve/tls/tls.crt", "")),
    "HTTP probe in TLS mode": ("scheme", lambda d: main_container(_preset(d))["readinessProbe"]["httpGet"].update(
        scheme="HTTP")),
    "liveness on /health": ("livenessProbe", lambda d: main_container(_preset(d))["livenessProbe"]["httpGet"].update(
        path="/health")),
    "KServe's grace period": ("terminationGracePeriodSeconds", lambda d: _preset(d)["template"].update(
        terminationGracePeriodSeconds=60)),
    "short scheduler grace": ("scheduler's terminationGracePeriodSeconds", lambda d: _preset(d)["router"]
                              ["scheduler"].pop("template")),
    "one GPU for 40B": ("nvidia.com/gpu", lambda d: main_container(named(d, "falcon-40b")["spec"])["resources"]
                        ["limits"].update({"nvidia.com/gpu": "1"})),
    "40B on one rank": ("--tensor_parallel_size 1 but falcon-40b runs on 2", lambda d: main_container(
        named(d, "falcon-40b")["spec"])["args"].remove("--tensor_parallel_size=2")),
    "small /dev/shm budget": ("memory limit", lambda d: main_container(named(d, "falcon-40b")["spec"])["resources"]
                              ["limits"].update(memory="90Gi")),
    "unpinned weights": ("pinned revision", lambda d: named(d, "falcon-40b")["spec"]["model"].update(
        uri="hf://tiiuae/falcon-40b")),
    "another model name": ("same Falcon variant", lambda d: named(d, "falcon-40b")["spec"]["model"].update(
        name="falcon")),
    "no engine label": ("llm-d.ai/engine-type", lambda d: _preset(d).pop("labels")),
    "vLLM's metrics": ("queuedRequestsSpec", lambda d: _engine(d).update(queuedRequestsSpec="vllm:num_requests_waiting")),
    "no preset": ("baseRefs", lambda d: named(d, "falcon-40b")["spec"].pop("baseRefs")),
    "a typo in the preset": ("livenesProbe", lambda d: main_container(_preset(d)).update(livenesProbe={})),
}


@pytest.mark.parametrize("drift", DRIFTS, ids=list(DRIFTS))
def test_drift_is_reported(docs: list[Doc], families: dict[str, str], drift: str) -> None:
    expected, mutate = DRIFTS[drift]
    docs = copy.deepcopy(docs)
    mutate(docs)
    problems = llmisvc_problems(named(docs, "falcon-40b"), docs, families, tls=True)
    assert any(expected in problem for problem in problems), problems


def test_a_template_the_checks_do_not_know_fails() -> None:
    with pytest.raises(ValueError, match="template"):
        render({"a": "{{ .Spec.Replicas }}"}, "m", "ns", tls=False)


def test_the_preset_is_valid_yaml_for_kubectl(docs: list[Doc]) -> None:
    # The shell line must survive YAML folding: one line, the templates whole.
    script = main_container(_preset(docs))["command"][2]
    assert "\n" not in script and script.count("{{") == script.count("}}")
    assert yaml.safe_load(yaml.safe_dump(docs[0])) == docs[0]
