"""Checks on what scales the server out: the metric names that dashboards, autoscalers and the endpoint picker
query, the autoscale/ overlay and the inference-pool/ overlay. Each returns the problems it finds (empty when all
is well), so a test can assert both that the shipped files pass and that a drifted copy is reported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import yaml
from manifest_checks import MANIFESTS, Doc, kserve_container, parse_args, pod_of
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = MANIFESTS / "grafana" / "falcon-dashboard.json"
# The KV-cache metrics come with the KV-cache rewrite (the lead's): named here so that the manifests and the
# dashboard can use them before the server exports them. Name -> Prometheus type.
KV_CACHE_METRICS = {"falcon_kv_cache_usage_ratio": "gauge", "falcon_cache_config_info": "gauge",
                    "falcon_prefix_cache_queries_total": "counter", "falcon_prefix_cache_hits_total": "counter"}
# The series each type of metric is exposed as (prometheus_client's text format).
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created")}
# What llm-d-router's core-metrics-extractor maps for an engine: (engine config field, the model-server-protocol
# metric's type). Each must name a metric this server exports.
ENGINE_METRIC_SPECS = {
    "queuedRequestsSpec": "gauge",
    "runningRequestsSpec": "gauge",
    "kvUsageSpec": "gauge",
    "cacheInfoSpec": "gauge",
}
# The LoRA metric is exported only while adapters are served (vLLM's vllm:lora_requests_info, same labels).
LORA_METRIC = "falcon_lora_requests_info"
# The pod label the extractor picks an engine's mapping by, and the engine name this server's pods carry.
ENGINE_LABEL = "llm-d.ai/engine-type"
ENGINE = "falcon-predictor"
# The picker's flags that named metrics before the extractor did: deprecated, and refused when set.
DEPRECATED_EPP_FLAGS = ("--total-queued-requests-metric", "--total-running-requests-metric",
                        "--kv-cache-usage-percentage-metric", "--lora-info-metric", "--cache-info-metric")
EPP_CONFIG_API = "llm-d.ai/v1alpha1"
PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "count", "le", "without", "avg", "max", "min",
                "label_values", "irate", "increase", "on", "ignoring"}


def exported_families(exposition: str) -> dict[str, str]:
    """Metric family -> type, from a Prometheus text exposition (what ``GET /metrics`` answers). The ``_created``
    timestamps prometheus_client writes beside counters and histograms are not metrics of their own."""
    return {family.name: family.type for family in text_string_to_metric_families(exposition)
            if not family.name.endswith("_created")}


def family_types(families: dict[str, str]) -> dict[str, str]:
    """Family names as the metrics are written in a query (a counter's with ``_total``) -> type."""
    return {(f"{name}_total" if kind == "counter" else name): kind for name, kind in families.items()}


def series_names(families: dict[str, str]) -> set[str]:
    """Every series name a query may select for these families (``_bucket`` of a histogram, ``_total`` ...)."""
    return {name + suffix for name, kind in families.items() for suffix in _SUFFIXES.get(kind, ("",))}


def with_kv_cache_metrics(families: dict[str, str]) -> dict[str, str]:
    kv = {name.removesuffix("_total"): kind for name, kind in KV_CACHE_METRICS.items()}
    return {**kv, **families}


def selected_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: every identifier followed by a label selector or a range, and
    every falcon_ name (a bare one selects too)."""
    names = set(re.findall(r"([a-zA-Z_:][\w:]*)\s*[{\[]", expr)) | set(re.findall(r"\b(falcon_\w+)", expr))
    return names - PROMQL_WORDS


def unexported(exprs: list[str], series: set[str]) -> list[str]:
    return sorted({f"{name} (in {expr!r})" for expr in exprs for name in selected_metrics(expr) if name not in series})


# ---- the dashboard ------------------------------------------------------------------------------------------------

def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # rows hold panels


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression the dashboard runs: its panels' targets and its query variables."""
    exprs = [t["expr"] for p in _panels(dashboard.get("panels", [])) for t in p.get("targets", []) if "expr" in t]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


# ---- the autoscale/ overlay ---------------------------------------------------------------------------------------

def external_metrics(isvc: Doc) -> list[Doc]:
    return [m["external"] for m in isvc["spec"]["predictor"].get("autoScaling", {}).get("metrics", [])
            if m.get("type") == "External"]


def autoscale_problems(isvc: Doc, docs: list[Doc], series: set[str]) -> list[str]:
    """KEDA on one Prometheus query of this server's metrics, for this model's pods, with a target that leaves a
    full batch per replica before adding one."""
    name, predictor = isvc["metadata"]["name"], isvc["spec"]["predictor"]
    annotations = isvc["metadata"].get("annotations", {})
    problems = []
    if annotations.get("serving.kserve.io/autoscalerClass") != "keda":
        problems.append("annotation serving.kserve.io/autoscalerClass must be keda")
    if "scaleMetric" in predictor or "scaleTarget" in predictor:
        problems.append("KEDA refuses scaleMetric/scaleTarget: the metric belongs in autoScaling.metrics")
    if not 1 <= predictor.get("minReplicas", 1) < predictor.get("maxReplicas", 1):
        problems.append(f"replicas: want 1 <= minReplicas < maxReplicas, got {predictor.get('minReplicas')}, "
                        f"{predictor.get('maxReplicas')}")
    metrics = external_metrics(isvc)
    if len(metrics) != 1:
        return problems + [f"want one External metric, got {len(metrics)}"]
    metric, target = metrics[0]["metric"], metrics[0]["target"]
    if metric.get("backend") != "prometheus" or not metric.get("serverAddress"):
        problems.append("the External metric needs backend prometheus and a serverAddress")
    query = metric.get("query", "")
    problems += [f"the query selects {p}, which the server does not export" for p in unexported([query], series)]
    if not re.search(rf'pod=~"{re.escape(name)}-predictor-\.\*"', query):
        problems.append(f"the query must select {name}'s own pods (pod=~\"{name}-predictor-.*\")")
    config, _ = parse_args(kserve_container(pod_of(isvc, docs)).get("args", []))
    batch = config.max_batch_size if config else 0
    # A full batch plus a short queue: below the batch a replica is added while the running one has room; far above
    # it requests queue for long before one is.
    if target.get("type") != "AverageValue" or not batch <= float(target.get("averageValue", 0)) <= 1.25 * batch:
        problems.append(f"target: an AverageValue between the batch size ({batch}) and 1.25 times it per replica, "
                        f"got {target}")
    return problems


# ---- the inference-pool/ overlay ----------------------------------------------------------------------------------

def epp_flags(deployment: Doc) -> dict[str, str]:
    args = deployment["spec"]["template"]["spec"]["containers"][0].get("args", [])
    return dict(arg.split("=", 1) for arg in args if "=" in arg)


def pool_problems(docs: list[Doc], families: dict[str, str]) -> list[str]:
    """Each InferencePool selects one model's predictor pods at the server's port, its endpoint picker's Service
    exists, the picker's config maps metrics the server exports with the protocol's types, and a route
    sends that model's OpenAI paths to the pool."""
    by_kind: dict[str, list[Doc]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    pools = by_kind.get("InferencePool", [])
    problems = [] if pools else ["no InferencePool"]
    isvcs = {i["metadata"]["name"] for i in by_kind.get("InferenceService", [])}
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    pickers = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    for pool in pools:
        name, spec = pool["metadata"]["name"], pool["spec"]
        labels = spec["selector"]["matchLabels"]
        if labels != {"serving.kserve.io/inferenceservice": name, "component": "predictor"} or name not in isvcs:
            problems.append(f"{name}: the selector must pick that InferenceService's predictor pods, got {labels}")
        isvc_labels = next((i["spec"]["predictor"].get("labels", {}) for i in by_kind.get("InferenceService", [])
                            if i["metadata"]["name"] == name), {})
        if isvc_labels.get(ENGINE_LABEL) != ENGINE:
            problems.append(f"{name}: its pods need the label {ENGINE_LABEL}: {ENGINE} (predictor.labels)")
        if [p["number"] for p in spec["targetPorts"]] != [8080]:
            problems.append(f"{name}: the target port must be the server's 8080 (it serves /metrics too)")
        picker = spec.get("endpointPickerRef", {}).get("name")
        service = services.get(picker)
        if service is None or picker not in pickers:
            problems.append(f"{name}: endpoint picker {picker!r} has no Service and Deployment here")
            continue
        flags = epp_flags(pickers[picker])
        if flags.get("--pool-name") != name:
            problems.append(f"{name}: the picker's --pool-name is {flags.get('--pool-name')!r}")
        problems += [f"{name}: {flag} is deprecated and refused: map metrics in the config's core-metrics-extractor"
                     for flag in DEPRECATED_EPP_FLAGS if flag in flags]
        problems += [f"{name}: {p}" for p in picker_probe_problems(pickers[picker])]
        problems += [f"{name}: {p}" for p in epp_config_problems(epp_config(docs, picker), families)]
        problems += _route_problems(name, by_kind.get("HTTPRoute", []))
    return problems


def picker_probe_problems(deployment: Doc) -> list[str]:
    """The picker's gRPC health service names: ``liveness`` and ``readiness`` (an unknown name, such as the old
    ``inference-extension``, answers SERVICE_UNKNOWN once leader election is on)."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return [f"{kind}: gRPC service {container.get(kind, {}).get('grpc', {}).get('service')!r}, want {service!r}"
            for kind, service in (("livenessProbe", "liveness"), ("readinessProbe", "readiness"))
            if container.get(kind, {}).get("grpc", {}).get("service") != service]


def epp_config_problems(config: Doc, families: dict[str, str], engine: str = ENGINE) -> list[str]:
    """An EndpointPickerConfig in llm-d-router's group whose core-metrics-extractor maps ``engine`` (the pods'
    engine label) onto metrics the server exports, wired to the metrics source, with every pluginRef declared."""
    problems = [] if config.get("apiVersion") == EPP_CONFIG_API else [
        f"the picker's config is {config.get('apiVersion')}, want {EPP_CONFIG_API}"]
    plugins = {p.get("name", p["type"]): p for p in config.get("plugins", [])}
    extractor = plugins.get("core-metrics-extractor", {}).get("parameters", {})
    if extractor.get("engineLabelKey", ENGINE_LABEL) != ENGINE_LABEL:
        problems.append(f"the extractor reads the engine from {extractor['engineLabelKey']}, want {ENGINE_LABEL}")
    mapping = next((c for c in extractor.get("engineConfigs", []) if c.get("name") == engine), None)
    if mapping is None:
        return problems + [f"core-metrics-extractor maps no engine {engine!r}: the pods would be read as vLLM"]
    types = family_types(families)
    for field, kind in ENGINE_METRIC_SPECS.items():
        if types.get(mapping.get(field)) != kind:
            problems.append(f"{field}={mapping.get(field)} is not a {kind} the server exports")
    if mapping.get("loraSpec") not in (LORA_METRIC, None) and types.get(mapping.get("loraSpec")) != "gauge":
        problems.append(f"loraSpec={mapping.get('loraSpec')} is neither {LORA_METRIC} nor an exported gauge")
    sources = config.get("dataLayer", {}).get("sources", [])
    wired = {(s.get("pluginRef"), e.get("pluginRef")) for s in sources for e in s.get("extractors", [])}
    if ("metrics-data-source", "core-metrics-extractor") not in wired:
        problems.append("dataLayer must wire metrics-data-source to core-metrics-extractor (else defaults replace it)")
    refs = {p["pluginRef"] for profile in config.get("schedulingProfiles", []) for p in profile["plugins"]}
    refs |= {ref for pair in wired for ref in pair}
    problems += [f"pluginRef {ref} is not declared in plugins" for ref in sorted(refs - set(plugins))]
    return problems


def _route_problems(pool: str, routes: list[Doc]) -> list[str]:
    ref = {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool}
    rules = [r for route in routes for r in route["spec"]["rules"] if ref in r.get("backendRefs", [])]
    paths = [m["path"]["value"] for r in rules for m in r.get("matches", [])]
    if f"/{pool}/openai/" not in paths:
        return [f"{pool}: no route sends /{pool}/openai/ to the pool (got {paths})"]
    return []


def epp_config(docs: list[Doc], picker: str) -> Doc:
    """The EndpointPickerConfig the picker's --config-file names, from the ConfigMap mounted there."""
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == picker)
    path = Path(epp_flags(deployment)["--config-file"])
    pod = deployment["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == str(path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and
                      d["metadata"]["name"] == volume["configMap"]["name"])
    return yaml.safe_load(config_map["data"][path.name])
