"""What scales the server out, checked offline: the autoscale/ and inference-pool/ overlays render with kustomize
and validate strictly (InferenceService, HTTPRoute and InferencePool against their CRD schemas in
inferenceservices/schemas, the endpoint picker's core kinds against Kubernetes' own), and every metric name that
they, the Grafana dashboard and the scraping annotations rely on is one the server exports, with the right type.
Each check is also shown to report a drifted copy.

The exported names come from the metrics the server registers (``predictor.metrics`` in the default registry, as
KServe's /metrics serves them; test_observability.py reads a real server's), plus the KV-cache metrics of the
KV-cache rewrite (``scale_checks.KV_CACHE_METRICS``).
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import yaml
from manifest_checks import MANIFESTS, Doc, all_problems, schema_problems
from prometheus_client import REGISTRY, generate_latest
from scale_checks import (
    autoscale_problems,
    dashboard_queries,
    epp_config,
    exported_families,
    load_dashboard,
    pool_problems,
    series_names,
    unexported,
    with_kv_cache_metrics,
)
from test_manifests import kustomize, named, of_kind

import predictor.metrics  # noqa: F401 - registers the server's metrics in the default registry


@pytest.fixture(scope="module")
def families() -> dict[str, str]:
    return with_kv_cache_metrics(exported_families(generate_latest(REGISTRY).decode()))


@pytest.fixture(scope="module")
def series(families: dict[str, str]) -> set[str]:
    return series_names(families)


@pytest.fixture
def autoscaled() -> list[Doc]:
    return kustomize(MANIFESTS / "autoscale")


@pytest.fixture
def pooled() -> list[Doc]:
    return kustomize(MANIFESTS / "inference-pool")


def test_the_declared_metrics_are_the_ones_the_operations_table_lists(families: dict[str, str]) -> None:
    readme = (MANIFESTS.parent / "docs" / "operations.md").read_text()
    falcon = {name for name in series_names(families) if name.startswith("falcon_")
              and not name.endswith(("_bucket", "_sum", "_count", "_created"))}
    assert sorted(name for name in falcon if f"`{name}`" not in readme) == []


# ---- scraping -------------------------------------------------------------------------------------------------------

def test_every_predictor_is_scraped_by_prometheus() -> None:
    for isvc in of_kind(kustomize(MANIFESTS), "InferenceService"):
        assert isvc["metadata"]["annotations"].get("serving.kserve.io/enable-prometheus-scraping") == "true"


# ---- autoscaling ----------------------------------------------------------------------------------------------------

def test_the_autoscale_overlay_renders_and_validates_strictly(autoscaled: list[Doc], series: set[str]) -> None:
    assert sorted(d["kind"] for d in autoscaled) == ["HTTPRoute"] + ["InferenceService"] * 4 + ["ServingRuntime"]
    for doc in autoscaled:
        assert schema_problems(doc) == []
    for isvc in of_kind(autoscaled, "InferenceService"):
        assert all_problems(isvc, autoscaled) == []
        assert autoscale_problems(isvc, autoscaled, series) == []


def _external(isvc: Doc) -> Doc:
    return isvc["spec"]["predictor"]["autoScaling"]["metrics"][0]["external"]


AUTOSCALE_DRIFTS: dict[str, tuple[str, Callable[[Doc], None]]] = {
    "hpa class": ("autoscalerClass", lambda i: i["metadata"]["annotations"].pop("serving.kserve.io/autoscalerClass")),
    "scaleMetric kept": ("scaleMetric", lambda i: i["spec"]["predictor"].update(scaleMetric="cpu")),
    "unknown metric": ("does not export", lambda i: _external(i)["metric"].update(
        query='sum(vllm:num_requests_running{pod=~"falcon-40b-predictor-.*"})')),
    "another model's pods": ("own pods", lambda i: _external(i)["metric"].update(
        query='sum(falcon_waiting_requests{pod=~"falcon-7b-predictor-.*"})')),
    "target below a batch": ("batch size (256)", lambda i: _external(i)["target"].update(averageValue="36")),
    "target far past a batch": ("batch size (256)", lambda i: _external(i)["target"].update(averageValue="1024")),
    "one replica": ("maxReplicas", lambda i: i["spec"]["predictor"].update(maxReplicas=1)),
}


@pytest.mark.parametrize("drift", AUTOSCALE_DRIFTS, ids=list(AUTOSCALE_DRIFTS))
def test_autoscale_drift_is_reported(autoscaled: list[Doc], series: set[str], drift: str) -> None:
    expected, mutate = AUTOSCALE_DRIFTS[drift]
    isvc = named(autoscaled, "falcon-40b")
    mutate(isvc)
    problems = autoscale_problems(isvc, autoscaled, series)
    assert any(expected in problem for problem in problems), problems


# ---- the InferencePool ----------------------------------------------------------------------------------------------

def test_the_inference_pool_overlay_renders_and_validates_strictly(pooled: list[Doc], families: dict[str, str]) -> None:
    kinds = sorted(d["kind"] for d in pooled)
    assert kinds.count("InferencePool") == 1 and {"Deployment", "Service", "ConfigMap", "Role"} <= set(kinds)
    for doc in pooled:
        assert schema_problems(doc) == [], doc["kind"]
    for isvc in of_kind(pooled, "InferenceService"):
        assert all_problems(isvc, pooled) == []
    assert pool_problems(pooled, families) == []


def test_the_endpoint_picker_scores_queue_kv_cache_prefix_and_lora_affinity(pooled: list[Doc]) -> None:
    pool = of_kind(pooled, "InferencePool")[0]
    config = epp_config(pooled, pool["spec"]["endpointPickerRef"]["name"])
    assert config["kind"] == "EndpointPickerConfig"
    weighted = {p["pluginRef"] for profile in config["schedulingProfiles"] for p in profile["plugins"]
                if p.get("weight")}
    assert weighted == {"queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer", "lora-affinity-scorer"}
    assert {p["pluginRef"] for p in config["schedulingProfiles"][0]["plugins"]} <= {p["type"] for p in config["plugins"]}


def _picker_args(docs: list[Doc]) -> list[str]:
    return of_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]


def _edit_epp_config(docs: list[Doc], change: Callable[[Doc], None]) -> None:
    config_map = of_kind(docs, "ConfigMap")[0]
    config = yaml.safe_load(config_map["data"]["epp-config.yaml"])
    change(config)
    config_map["data"]["epp-config.yaml"] = yaml.safe_dump(config)


def _falcon_engine(config: Doc) -> Doc:
    extractor = next(p for p in config["plugins"] if p["type"] == "core-metrics-extractor")
    return next(c for c in extractor["parameters"]["engineConfigs"] if c["name"] == "falcon-predictor")


POOL_DRIFTS: dict[str, tuple[str, Callable[[list[Doc]], None]]] = {
    "vLLM's queue metric": ("queuedRequestsSpec", lambda d: _edit_epp_config(d, lambda c: _falcon_engine(c).update(
        queuedRequestsSpec="vllm:num_requests_waiting"))),
    "running sequences for requests": ("runningRequestsSpec", lambda d: _edit_epp_config(
        d, lambda c: _falcon_engine(c).update(runningRequestsSpec="falcon_running_sequence"))),
    "a counter for the KV gauge": ("kvUsageSpec", lambda d: _edit_epp_config(d, lambda c: _falcon_engine(c).update(
        kvUsageSpec="falcon_prefix_cache_hits_total"))),
    "an unknown LoRA metric": ("loraSpec", lambda d: _edit_epp_config(d, lambda c: _falcon_engine(c).update(
        loraSpec="falcon_lora_info"))),
    "no engine mapping": ("maps no engine", lambda d: _edit_epp_config(d, lambda c: _falcon_engine(c).update(
        name="vllm"))),
    "metrics not wired": ("dataLayer", lambda d: _edit_epp_config(d, lambda c: c.pop("dataLayer"))),
    "the old config group": ("llm-d.ai/v1alpha1", lambda d: _edit_epp_config(d, lambda c: c.update(
        apiVersion="inference.networking.x-k8s.io/v1alpha1"))),
    "a deprecated metric flag": ("--total-queued-requests-metric", lambda d: _picker_args(d).append(
        "--total-queued-requests-metric=falcon_waiting_requests")),
    "the old health service": ("readinessProbe", lambda d: of_kind(d, "Deployment")[0]["spec"]["template"]["spec"]
                               ["containers"][0]["readinessProbe"]["grpc"].update(service="inference-extension")),
    "pods without the engine label": ("llm-d.ai/engine-type", lambda d: named(
        of_kind(d, "InferenceService"), "falcon-7b-instruct")["spec"]["predictor"].pop("labels")),
    "selector": ("selector", lambda d: of_kind(d, "InferencePool")[0]["spec"]["selector"]["matchLabels"].update(
        app="falcon")),
    "port": ("target port", lambda d: of_kind(d, "InferencePool")[0]["spec"].update(targetPorts=[{"number": 80}])),
    "route to the Service": ("no route", lambda d: [r.update(backendRefs=[{"name": "falcon-7b-instruct-predictor",
                                                                            "port": 80}])
                                                     for r in of_kind(d, "HTTPRoute")[0]["spec"]["rules"]]),
}


@pytest.mark.parametrize("drift", POOL_DRIFTS, ids=list(POOL_DRIFTS))
def test_pool_drift_is_reported(pooled: list[Doc], families: dict[str, str], drift: str) -> None:
    expected, mutate = POOL_DRIFTS[drift]
    mutate(pooled)
    problems = pool_problems(pooled, families)
    assert any(expected in problem for problem in problems), problems


def test_a_typo_in_the_pool_or_the_picker_fails_validation(pooled: list[Doc]) -> None:
    pool = copy.deepcopy(of_kind(pooled, "InferencePool")[0])
    pool["spec"]["endpointPickerRef"]["failMode"] = "FailOpen"
    assert any("failMode" in p for p in schema_problems(pool))
    picker = copy.deepcopy(of_kind(pooled, "Deployment")[0])
    picker["spec"]["template"]["spec"]["containers"][0]["argz"] = []
    assert any("argz" in p for p in schema_problems(picker))


# ---- the dashboard --------------------------------------------------------------------------------------------------

def test_the_dashboard_queries_only_exported_metrics(series: set[str]) -> None:
    queries = dashboard_queries(load_dashboard())
    assert len(queries) > 10
    assert unexported(queries, series) == []


def test_the_dashboard_charts_every_serving_metric(families: dict[str, str]) -> None:
    queried = " ".join(dashboard_queries(load_dashboard()))
    falcon = sorted(name for name in families if name.startswith("falcon_"))
    assert [name for name in falcon if name not in queried] == []


def test_a_dashboard_query_of_an_unknown_metric_is_reported(series: set[str]) -> None:
    dashboard = load_dashboard()
    dashboard["panels"][0]["targets"][0]["expr"] = "sum(rate(falcon_request_total[5m]))"
    assert unexported(dashboard_queries(dashboard), series) == [
        "falcon_request_total (in 'sum(rate(falcon_request_total[5m]))')"]
