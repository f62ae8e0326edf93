"""Checks on the LLMInferenceServices in inferenceservices/llm-inference-service/: what KServe builds from a service
and its `falcon-predictor` preset is a pod that meets KServe's contract and this server's own expectations.

KServe renders each preset's Go templates for the service, merges the presets named in `baseRefs` and then the
service (maps by key, containers and volumes by name, mounts by path; other lists replaced), and validates the
result against the LLMInferenceService schema. ``workload_spec`` does the same for the few templates the preset
uses; a template it does not know is an error, not a silent pass. Each check returns the problems it finds.
"""

from __future__ import annotations

import copy
import re
import shlex
from typing import Any

from manifest_checks import (
    MODEL_DIR,
    EAGER_OVER_FLOOR,
    Doc,
    memory_problems,
    parse_args,
    pre_stop_seconds,
    probe_problems,
    schema_problems,
    tensor_parallel_problems,
)
from scale_checks import ENGINE, ENGINE_LABEL, epp_config_problems

from predictor.config import SHUTDOWN_AFTER_DRAIN_S, ServerConfig, build_parser
from predictor.variants import VARIANTS

PORT = 8000  # KServe's workload Service and InferencePool target this port, hard-coded
CONTAINER = "main"  # the container KServe's presets and services merge by name
TLS_DIR = "/var/run/kserve/tls"  # where KServe mounts the service's certificate in TLS mode
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
               "volumeMounts": "mountPath", "ports": "containerPort", "plugins": "type"}


# ---- what KServe does with a service and its presets ---------------------------------------------------------------

def render(value: Any, name: str, namespace: str, tls: bool) -> Any:
    """``value`` with KServe's templates filled in for a service whose model is ``name``."""
    if isinstance(value, dict):
        return {key: render(item, name, namespace, tls) for key, item in value.items()}
    if isinstance(value, list):
        return [render(item, name, namespace, tls) for item in value]
    if not isinstance(value, str):
        return value
    text = value.replace("{{ .Spec.Model.Name }}", name).replace("{{ .ObjectMeta.Namespace }}", namespace)
    branch = r"\{\{ if \.GlobalConfig\.EnableTLS \}\}(.*?)(?:\{\{ else \}\}(.*?))?\{\{ end \}\}"
    text = re.sub(branch, lambda m: m.group(1) if tls else (m.group(2) or ""), text, flags=re.S)
    if "{{" in text:
        raise ValueError(f"a template these checks do not render: {text!r}")
    return text


def merge(base: Any, override: Any, key: str | None = None) -> Any:
    """``override`` merged onto ``base`` the way KServe merges presets (a strategic merge of the spec)."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for field, value in override.items():
            out[field] = merge(base[field], value, field) if field in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(override, list) and key in _MERGE_KEYS:
        by = _MERGE_KEYS[key]
        out = [copy.deepcopy(item) for item in base]
        for item in override:
            match = next((i for i, old in enumerate(out) if old.get(by) == item.get(by)), None)
            if match is None:
                out.append(copy.deepcopy(item))
            else:
                out[match] = merge(out[match], item)
        return out
    return copy.deepcopy(override)


def presets_of(docs: list[Doc]) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == "LLMInferenceServiceConfig"}


def workload_spec(service: Doc, presets: dict[str, Doc], namespace: str = "falcon", tls: bool = False) -> Doc:
    """The service's spec after its presets, rendered: what KServe builds the pods from (its own well-known presets
    come first, and only fill in what neither this project's preset nor the service sets)."""
    spec: Doc = {}
    for ref in service["spec"].get("baseRefs", []):
        spec = merge(spec, presets[ref["name"]]["spec"])
    spec = merge(spec, {k: v for k, v in service["spec"].items() if k != "baseRefs"})
    name = spec.get("model", {}).get("name", service["metadata"]["name"])
    return render(spec, name, namespace, tls)


def main_container(spec: Doc) -> Doc:
    return next(c for c in spec.get("template", {}).get("containers", []) if c.get("name") == CONTAINER)


def server_args(container: Doc) -> list[str] | None:
    """The arguments ``python -m predictor`` gets: the preset's shell line, then the service's args ($@)."""
    command = container.get("command", [])
    if command[:2] != ["/bin/sh", "-c"] or len(command) < 3:
        return None
    words = shlex.split(command[2])
    if words[:4] != ["exec", "python", "-m", "predictor"] or words[-1] != "$@":
        return None
    return words[4:-1] + list(container.get("args", []))


# ---- the checks ------------------------------------------------------------------------------------------------------

def llmisvc_problems(service: Doc, docs: list[Doc], families: dict[str, str], tls: bool = False,
                     namespace: str = "falcon") -> list[str]:
    presets = presets_of(docs)
    missing = [r["name"] for r in service["spec"].get("baseRefs", []) if r["name"] not in presets]
    if missing or not service["spec"].get("baseRefs"):
        return [f"baseRefs must name this project's preset (missing: {missing or 'all'})"]
    spec = workload_spec(service, presets, namespace, tls)
    rendered = {"apiVersion": service["apiVersion"], "kind": service["kind"], "metadata": service["metadata"],
                "spec": spec}
    problems = [f"merged: {p}" for p in schema_problems(rendered)]
    if spec.get("labels", {}).get(ENGINE_LABEL) != ENGINE:
        problems.append(f"the pods need the label {ENGINE_LABEL}: {ENGINE}: the picker maps metrics by it")
    scheduler = spec.get("router", {}).get("scheduler")
    if scheduler is None:
        problems.append("router.scheduler: without it no endpoint picker routes the OpenAI paths")
    else:
        problems += [f"scheduler: {p}" for p in epp_config_problems(scheduler.get("config", {}).get("inline", {}),
                                                                    families)]
    return problems + workload_problems(service, spec, tls, namespace)


def workload_problems(service: Doc, spec: Doc, tls: bool, namespace: str) -> list[str]:
    template = spec.get("template", {})
    try:
        container = main_container(spec)
    except StopIteration:
        return [f"no container named {CONTAINER!r}: KServe's vLLM container would run instead"]
    args = server_args(container)
    if args is None:
        return ["main's command must be `/bin/sh -c 'exec python -m predictor ... \"$@\"'`: else vLLM's runs"]
    config, problems = parse_args(args)
    if config is None:
        return problems
    name = spec.get("model", {}).get("name")
    variant = VARIANTS.get(config.model_name)
    if variant is None or name != config.model_name or service["metadata"]["name"] != config.model_name:
        return problems + [f"--model_name {config.model_name!r}, spec.model.name {name!r} and the service's name "
                           "must be the same Falcon variant"]
    alias = f"publishers/{namespace}/models/{name}"
    if alias not in config.model_aliases:
        problems.append(f"--model_alias {alias}: KServe's routes and scheduler name the model so")
    if config.http_port != PORT or [p.get("containerPort") for p in container.get("ports", [])] != [PORT]:
        problems.append(f"the server must listen on {PORT}, KServe's port for the workload and the pool")
    if config.model_dir != MODEL_DIR:
        problems.append(f"--model_dir must be {MODEL_DIR}, where KServe puts the weights")
    if config.dtype not in ("auto", variant.dtype):
        problems.append(f"--dtype {config.dtype} but {variant.name} is served in {variant.dtype}")
    uri = spec.get("model", {}).get("uri", "")
    if uri != variant.hf_uri and not uri.startswith("oci://"):
        problems.append(f"model.uri {uri!r} is neither {variant.hf_uri} (the pinned revision) nor an oci:// image")
    limits = container.get("resources", {}).get("limits", {})
    if int(limits.get("nvidia.com/gpu", 0)) != variant.gpus:
        problems.append(f"nvidia.com/gpu limit {limits.get('nvidia.com/gpu')} but {variant.name} needs {variant.gpus}")
    problems += tensor_parallel_problems(config, variant)
    problems += memory_problems(variant, template, container)
    problems += tls_problems(container, args, tls)
    problems += probe_problems(container, config)
    problems += drain_problems(template, container, config)
    scheduler_grace = spec.get("router", {}).get("scheduler", {}).get("template", {}).get(
        "terminationGracePeriodSeconds", 60)
    if scheduler_grace < template.get("terminationGracePeriodSeconds", 30):
        problems.append("the scheduler's terminationGracePeriodSeconds must be at least the workload's (KServe)")
    if pre_stop_seconds(container) < 15:
        problems.append("preStop: KServe's picker and Service need 15 s to drop the pod before SIGTERM")
    context = container.get("securityContext", {})
    if context.get("runAsNonRoot") is not True or "ALL" not in context.get("capabilities", {}).get("drop", []):
        problems.append("securityContext: runAsNonRoot and capabilities.drop ALL")
    return problems


def drain_problems(template: Doc, container: Doc, config: ServerConfig) -> list[str]:
    """A long generation finishes (KServe's route sets no request timeout, so --request_timeout is the bound), and
    SIGTERM's drain fits the grace period after the preStop sleep."""
    variant = VARIANTS[config.model_name]
    longest = 2 * variant.context_length * EAGER_OVER_FLOOR * variant.decode_floor_ms / 1e3
    needed = pre_stop_seconds(container) + config.drain_timeout_s + SHUTDOWN_AFTER_DRAIN_S
    problems = []
    if config.request_timeout_s < longest:
        problems.append(f"--request_timeout {config.request_timeout_s} s < {longest:.0f} s (two 2048-token answers)")
    if config.drain_timeout_s < config.request_timeout_s:
        problems.append("--drain_timeout is shorter than --request_timeout: SIGTERM would cut in-flight requests")
    if template.get("terminationGracePeriodSeconds", 30) < needed:
        problems.append(f"terminationGracePeriodSeconds < {needed:.0f} s: preStop + --drain_timeout + the "
                        f"{SHUTDOWN_AFTER_DRAIN_S} s the server may take to exit")
    return problems


def tls_problems(container: Doc, args: list[str], tls: bool) -> list[str]:
    """In KServe's TLS mode the server serves HTTPS with the mounted certificate and the probes speak HTTPS; out of
    it, plain HTTP (the probes and the picker would fail the handshake otherwise)."""
    parsed = build_parser().parse_args(args)  # KServe's own --ssl_* flags, which ServerConfig does not keep
    want = "HTTPS" if tls else "HTTP"
    problems = [f"{kind}: scheme {scheme}, want {want}" for kind in ("startupProbe", "readinessProbe", "livenessProbe")
                if (scheme := container.get(kind, {}).get("httpGet", {}).get("scheme", "HTTP")) != want]
    expected = (f"{TLS_DIR}/tls.crt", f"{TLS_DIR}/tls.key") if tls else (None, None)
    if (parsed.ssl_certfile, parsed.ssl_keyfile) != expected:
        problems.append(f"--ssl_certfile/--ssl_keyfile {parsed.ssl_certfile}, {parsed.ssl_keyfile}: want {expected}")
    return problems
