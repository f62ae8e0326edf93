"""Checks that the manifests in inferenceservices/ are what a KServe cluster accepts and what the predictor expects.

Each check returns the problems it finds (empty when all is well), so a test can assert both that the shipped
manifests pass and that a drifted copy is reported. Used by test_manifests.py.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
from kubernetes.utils import parse_quantity

from predictor.config import SHUTDOWN_AFTER_DRAIN_S, ServerConfig, build_parser, parse_config
from predictor.engine.model.kv_cache import ROW_CAP
from predictor.variants import VARIANTS, Variant

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "inferenceservices"
SCHEMA_DIR = MANIFESTS / "schemas"  # copied into the repository: see its README
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts the weights
GIB = 2**30
# Core kinds (Deployment, Service, RBAC, ...) are checked by kubernetes-validate's schemas of this release.
KUBERNETES_VERSION = "1.32"
# A startup probe must allow a falcon-40b load from disk (10+ minutes on ordinary volumes) twice over.
LOAD_BUDGET_S = 20 * 60
# Eager decode at batch 1 costs ~3.6x the memory-bandwidth floor, a read of each GPU's weights per token
# (Variant.decode_floor_ms: 4.6 ms for 7B, 13.9 ms for 40B split over two GPUs). --request_timeout must fit two
# 2048-token answers.
EAGER_OVER_FLOOR = 3.6
# Answer while the server runs, not tied to loading or draining (/livez fails only for an engine broken for minutes)
LIVENESS_ROUTES = {"/", "/v2/health/live", "/livez"}

Doc = dict[str, Any]

_spec = importlib.util.spec_from_file_location("expand", MANIFESTS / "expand.py")
expand = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(expand)


def runtimes(docs: list[Doc]) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") in expand.RUNTIME_KINDS}


def pod_of(isvc: Doc, docs: list[Doc]) -> Doc:
    """The predictor pod spec KServe builds for ``isvc``: the runtime merged in when it names one."""
    predictor = isvc["spec"]["predictor"]
    return expand.explicit_predictor(isvc, runtimes(docs)) if "model" in predictor else predictor


def kserve_container(pod: Doc) -> Doc:
    return next(c for c in pod["containers"] if c.get("name") == expand.CONTAINER_NAME)


def storage_uri(isvc: Doc, container: Doc) -> str | None:
    """Where the weights come from: the model's storageUri, the predictor's storageUris entry for /mnt/models, or
    the container's STORAGE_URI."""
    predictor = isvc["spec"]["predictor"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    mounted = {entry.get("mountPath", MODEL_DIR): entry["uri"] for entry in predictor.get("storageUris", [])}
    return predictor.get("model", {}).get("storageUri") or mounted.get(MODEL_DIR) or env.get("STORAGE_URI")


def adapter_problems(isvc: Doc, docs: list[Doc]) -> list[str]:
    """Each adapter the predictor serves by name (--lora_modules), and a draft model named by its path
    (--speculative_config), is fetched to its path by a storageUris entry, and no two entries share a mount path."""
    predictor = isvc["spec"]["predictor"]
    mounts = [entry.get("mountPath", MODEL_DIR) for entry in predictor.get("storageUris", [])]
    problems = [f"mount path {m} is used twice" for m in sorted(set(mounts)) if mounts.count(m) > 1]
    if predictor.get("storageUris") and predictor.get("model", {}).get("storageUri"):
        problems.append("the model's storageUri and the predictor's storageUris cannot both be set")
    config, _ = parse_args(kserve_container(pod_of(isvc, docs)).get("args", []))
    for name, path in config.lora_modules if config is not None else ():
        if path not in mounts or path == MODEL_DIR:
            problems.append(f"adapter {name}: {path} is not the mount path of a storageUris entry")
    draft = config.speculative.model if config is not None and config.speculative is not None else None
    if draft is not None and draft.startswith("/") and (draft not in mounts or draft == MODEL_DIR):
        problems.append(f"draft model: {draft} is not the mount path of a storageUris entry")
    return problems


# ---- schemas -------------------------------------------------------------------------------------------------------

def strict(schema: Doc) -> Doc:
    """``schema`` with ``additionalProperties: false`` wherever it lists properties and allows nothing else."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    return out


@functools.cache
def validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    table = {}
    for path in SCHEMA_DIR.glob("*.json"):
        crd = json.loads(path.read_text())
        table[(f"{crd['group']}/{crd['version']}", crd["kind"])] = jsonschema.Draft7Validator(
            strict(crd["openAPIV3Schema"]))
    return table


def schema_problems(doc: Doc) -> list[str]:
    validator = validators().get((doc.get("apiVersion"), doc.get("kind")))
    if validator is None and is_core_kind(doc):
        return core_problems(doc)
    if validator is None:
        return [f"no schema for {doc.get('apiVersion')} {doc.get('kind')}"]
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]
    metadata = doc.get("metadata", {})  # the CRDs leave metadata open: check the fields manifests may set
    problems += [f"metadata.{key}: not an ObjectMeta field this project sets" for key in metadata
                 if key not in {"name", "namespace", "labels", "annotations"}]
    problems += [f"metadata.{field}.{key}: values must be strings" for field in ("labels", "annotations")
                 for key, value in metadata.get(field, {}).items() if not isinstance(value, str)]
    return problems if metadata.get("name") else problems + ["metadata.name: required"]


def is_core_kind(doc: Doc) -> bool:
    """A kind Kubernetes itself serves: the core group ("v1") or one of its own groups (apps, rbac...k8s.io)."""
    group = doc.get("apiVersion", "").rpartition("/")[0]
    return "." not in group or group in {"rbac.authorization.k8s.io", "networking.k8s.io", "policy"}


def core_problems(doc: Doc) -> list[str]:
    """Strict validation (unknown keys refused) against Kubernetes' own schema; the first problem found."""
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.absolute_path)) or '<root>'}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {doc.get('apiVersion')} {doc.get('kind')}"]
    return []


# ---- what KServe's webhook checks ----------------------------------------------------------------------------------

def kserve_problems(isvc: Doc, docs: list[Doc]) -> list[str]:
    name, predictor = isvc["metadata"]["name"], isvc["spec"]["predictor"]
    problems = []
    if isvc["metadata"].get("annotations", {}).get("serving.kserve.io/deploymentMode") != "Standard":
        problems.append("annotation serving.kserve.io/deploymentMode must be Standard (a plain Deployment)")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        problems.append(f"name {name!r} is not a valid InferenceService name")
    if ("model" in predictor) == bool(predictor.get("containers")):
        return problems + ["the predictor needs exactly one of `model` (with a runtime) and `containers`"]
    if "model" in predictor:
        if not predictor["model"].get("modelFormat", {}).get("name"):
            return problems + ["predictor.model.modelFormat.name is required where a runtime is used"]
        try:
            runtime = expand.find_runtime(predictor["model"], runtimes(docs))
        except ValueError as exc:
            return problems + [str(exc)]
        formats = {f["name"] for f in runtime["spec"].get("supportedModelFormats", [])}
        if predictor["model"]["modelFormat"]["name"] not in formats:
            problems.append(f"runtime {runtime['metadata']['name']} does not support the model's format")
        containers = runtime["spec"].get("containers", [])
    else:
        containers = predictor["containers"]
    if not any(c.get("name") == expand.CONTAINER_NAME for c in containers):
        problems.append(f"no container named {expand.CONTAINER_NAME}: KServe would not find the predictor")
    return problems


# ---- what the predictor expects -------------------------------------------------------------------------------------

def parse_args(args: list[str]) -> tuple[ServerConfig | None, list[str]]:
    """The predictor's own parse of ``args``; exact flag names only (argparse would accept a typo'd prefix)."""
    known = build_parser()._option_string_actions
    problems = [f"{arg.split('=')[0]}: not a flag of python -m predictor" for arg in args
                if arg.startswith("--") and arg.split("=")[0] not in known]
    try:
        return parse_config(args), problems
    except SystemExit:
        return None, problems + [f"python -m predictor rejects the arguments {args}"]


def variant_problems(isvc: Doc, pod: Doc) -> list[str]:
    container = kserve_container(pod)
    config, problems = parse_args(container.get("args", []))
    if config is None:
        return problems
    variant = VARIANTS.get(config.model_name)
    if variant is None:
        return problems + [f"--model_name {config.model_name!r} is not one of {sorted(VARIANTS)}"]
    if isvc["metadata"]["name"] != variant.name:
        problems.append(f"InferenceService {isvc['metadata']['name']!r} serves {variant.name!r}: names must match")
    if "command" in container:
        problems.append("the container must not set `command`: the image's entrypoint is python -m predictor")
    if config.dtype not in ("auto", variant.dtype):
        problems.append(f"--dtype {config.dtype} but {variant.name} is served in {variant.dtype}")
    if config.model_dir != MODEL_DIR:
        problems.append(f"--model_dir must be {MODEL_DIR}, where the storage initializer puts the weights")
    uri = storage_uri(isvc, container) or ""
    if uri.startswith("pvc://") and not uri.rstrip("/").endswith(f"/{variant.name}"):
        problems.append(f"storage {uri} is not the {variant.name} directory of a claim")
    elif uri.startswith("oci://"):
        problems += modelcar_problems(uri, variant)
    elif not uri.startswith("pvc://") and uri != variant.hf_uri:
        problems.append(f"storage {uri!r} is not {variant.hf_uri} (the pinned revision)")
    # The batch: what the KV cache holds on the variant's smallest GPUs, within the server's cap on those GPUs (the
    # A100s and 24 GB GPUs the manifests also run on); pinned, because the autoscale/ target follows it.
    gpus, rows = needs(variant, config)
    batch = min(rows, ROW_CAP)
    if config.max_batch_size != batch:
        problems.append(f"--max_batch_size {config.max_batch_size} but {gpus} x {variant.gpu_gb} GB hold "
                        f"{rows} full {variant.name} sequences and the cap is {ROW_CAP}: want {batch}")
    resources = container.get("resources", {})
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    if int(limits.get("nvidia.com/gpu", 0)) != gpus:
        problems.append(f"nvidia.com/gpu limit {limits.get('nvidia.com/gpu')} but {variant.name} needs {gpus}")
    if int(requests.get("nvidia.com/gpu", gpus)) != gpus:
        problems.append("nvidia.com/gpu request differs from the limit")
    problems += tensor_parallel_problems(config, variant)
    return problems + memory_problems(variant, pod, container, config.quantization)


def needs(variant: Variant, config: ServerConfig) -> tuple[int, int]:
    """GPUs (of the variant's ``gpu_gb``) a replica takes: the variant's, or one where ``--quantization`` makes its
    weights fit one; and the full-context rows its KV cache (in ``--kv_cache_dtype``) holds there."""
    one_gpu_gib = variant.gpu_gb * 1e9 / 2**30 * 0.99  # what the driver reports of it
    fits_one = config.quantization is not None and variant.gpu_memory_gib_in(config.quantization) <= one_gpu_gib
    gpus = 1 if fits_one else variant.gpus
    return gpus, variant.rows_on(gpus, variant.gpu_gb, config.quantization, config.kv_cache_dtype)


def tensor_parallel_problems(config: ServerConfig, variant: Variant) -> list[str]:
    """A multi-GPU variant runs one tensor-parallel rank per GPU; a one-GPU variant runs one process."""
    gpus, _ = needs(variant, config)
    if config.tensor_parallel_size != gpus:
        return [f"--tensor_parallel_size {config.tensor_parallel_size} but {variant.name} runs on {gpus} "
                "GPU(s): one rank per GPU"]
    return []


def modelcar_problems(uri: str, variant: Variant) -> list[str]:
    """A weights image (KServe modelcar) named after the model and tagged with its pinned revision, so that the image
    says which checkpoint it holds (a tag like `latest` would let a rebuild change the weights under a deployment)."""
    repository, _, tag = uri.removeprefix("oci://").rpartition(":")
    if "/" in tag or not repository:
        return [f"storage {uri}: an oci:// image needs a tag, the revision {variant.revision}"]
    problems = [] if repository.rsplit("/", 1)[-1] == variant.name else [
        f"storage {uri}: the image's name must be the model's, {variant.name}"]
    if tag != variant.revision:
        problems.append(f"storage {uri}: tag {tag!r} is not the pinned revision {variant.revision}")
    return problems


def memory_problems(variant: Variant, pod: Doc, container: Doc, scheme: str | None = None) -> list[str]:
    """The memory rule: host memory holds a copy of the model's GPU memory while loading, plus memory-backed
    volumes (they are charged to the container); multi-GPU replicas get a memory-backed /dev/shm."""
    resources = container.get("resources", {})
    request = parse_quantity(resources.get("requests", {}).get("memory", "0")) / GIB
    limit = parse_quantity(resources.get("limits", {}).get("memory", "0")) / GIB
    in_memory = {v["name"]: parse_quantity(v["emptyDir"].get("sizeLimit", "0")) / GIB for v in pod.get("volumes", [])
                 if v.get("emptyDir", {}).get("medium") == "Memory"}
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    shm = sum(in_memory.get(name, 0) for name in mounts.values())
    problems = []
    needed = round(variant.gpu_memory_gib_in(scheme))
    if request < needed:
        problems.append(f"memory request {request} GiB < {needed} GiB, the model's GPU memory")
    if limit < max(request, needed + shm):
        problems.append(f"memory limit {limit} GiB < {needed} GiB + {shm} GiB memory-backed volumes")
    if variant.gpus > 1 and scheme is None and mounts.get("/dev/shm") not in in_memory:
        problems.append("a multi-GPU replica needs a memory-backed emptyDir at /dev/shm")
    return problems


def probe_problems(container: Doc, config: ServerConfig) -> list[str]:
    """Probes on the server's HTTP port that tell the truth (the paths are checked against the server below)."""
    problems = []
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container.get(kind, {}).get("httpGet")
        if get is None:
            problems.append(f"{kind}: an httpGet probe is required")
        elif ports.get(get["port"], get["port"]) != config.http_port:
            problems.append(f"{kind}: port {get['port']} is not the server's --http_port {config.http_port}")
    if problems:
        return problems
    ready_routes = {"/health", "/healthz", f"/v1/models/{config.model_name}", f"/v2/models/{config.model_name}/ready"}
    for kind in ("startupProbe", "readinessProbe"):
        if container[kind]["httpGet"]["path"] not in ready_routes:
            problems.append(f"{kind}: {container[kind]['httpGet']['path']} does not say whether the model is loaded")
    startup = container["startupProbe"]
    budget = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup.get(
        "failureThreshold", 3)
    if budget < LOAD_BUDGET_S:
        problems.append(f"startupProbe: {budget} s is less than {LOAD_BUDGET_S} s for a 40B load")
    liveness = container["livenessProbe"]
    if liveness["httpGet"]["path"] not in LIVENESS_ROUTES:
        problems.append(f"livenessProbe: {liveness['httpGet']['path']} fails while loading or draining: use "
                        f"{sorted(LIVENESS_ROUTES)}")
    if liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3) < 60 or liveness.get(
            "timeoutSeconds", 1) < 5:
        problems.append("livenessProbe: a busy server must get at least a minute (and 5 s per try) before a restart")
    return problems


def timing_problems(pod: Doc, config: ServerConfig) -> list[str]:
    """The nesting that lets a long generation finish: generation < gateway, preStop + drain + exit < grace period."""
    variant = VARIANTS[config.model_name]
    gpus, _ = needs(variant, config)
    longest = 2 * variant.context_length * EAGER_OVER_FLOOR * variant.decode_floor_ms_on(gpus, config.quantization) / 1e3
    sleep = pre_stop_seconds(kserve_container(pod))
    problems = []
    if config.request_timeout_s < longest:
        problems.append(f"--request_timeout {config.request_timeout_s} s < {longest:.0f} s (two 2048-token answers)")
    if pod.get("timeout", 60) < config.request_timeout_s:
        problems.append(f"timeout {pod.get('timeout', 60)} s cuts requests before --request_timeout")
    if config.drain_timeout_s < config.request_timeout_s:
        problems.append("--drain_timeout is shorter than --request_timeout: SIGTERM would cut in-flight requests")
    if pod.get("terminationGracePeriodSeconds", 30) < sleep + config.drain_timeout_s + SHUTDOWN_AFTER_DRAIN_S:
        problems.append(f"terminationGracePeriodSeconds < preStop {sleep} s + --drain_timeout + the "
                        f"{SHUTDOWN_AFTER_DRAIN_S} s the server may take to exit after its drain")
    return problems


def pre_stop_seconds(container: Doc) -> int:
    """How long the preStop hook holds the pod before SIGTERM: a sleep action, or `sleep N` as a command."""
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop.get("exec", {}).get("command", [])
    return int(command[1]) if command and Path(command[0]).name == "sleep" else 0  # sleep or /bin/sleep


def hardening_problems(pod: Doc, container: Doc) -> list[str]:
    context = container.get("securityContext", {})
    problems = [f"securityContext.{key} must be {want}" for key, want in (
        ("runAsNonRoot", True), ("allowPrivilegeEscalation", False), ("readOnlyRootFilesystem", True))
        if context.get(key) is not want]
    if "ALL" not in context.get("capabilities", {}).get("drop", []):
        problems.append("securityContext.capabilities.drop must include ALL")
    empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    writable = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in empty_dirs]
    env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
    for path in ("/tmp", env.get("HF_HOME", "<HF_HOME unset>")):
        if not any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable):
            problems.append(f"{path} is not on a writable emptyDir")
    return problems


def all_problems(isvc: Doc, docs: list[Doc]) -> list[str]:
    problems = kserve_problems(isvc, docs)
    if problems:
        return problems
    pod = pod_of(isvc, docs)
    container = kserve_container(pod)
    problems = variant_problems(isvc, pod) + hardening_problems(pod, container)
    config, _ = parse_args(container.get("args", []))
    if config is not None and config.model_name in VARIANTS:
        problems += probe_problems(container, config) + timing_problems(pod, config)
    return problems


# ---- the gateway route --------------------------------------------------------------------------------------------

def duration_s(text: str) -> float:
    """A Gateway API duration ("660s", "1h30m", "500ms") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|h|m|s)", text))


def route_problems(route: Doc, isvcs: list[Doc]) -> list[str]:
    """Each InferenceService at <gateway>/<name>/chat, rewritten to the predictor's /chat on its Service."""
    problems = []
    rules = route["spec"].get("rules", [])
    backends = {ref["name"] for rule in rules for ref in rule.get("backendRefs", [])}
    problems += [f"backend {b} is no InferenceService's predictor" for b in sorted(backends)
                 if b not in {f"{i['metadata']['name']}-predictor" for i in isvcs}]
    for isvc in isvcs:
        name = isvc["metadata"]["name"]
        matching = [r for r in rules if {"path": {"type": "Exact", "value": f"/{name}/chat"}, "method": "POST"}
                    in r.get("matches", [])]
        if len(matching) != 1:
            problems.append(f"{name}: {len(matching)} rules match POST /{name}/chat, want 1")
            continue
        rule = matching[0]
        rewrite = {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/chat"}}
        if rule.get("filters") != [{"type": "URLRewrite", "urlRewrite": rewrite}]:
            problems.append(f"{name}: the rule must rewrite the path to /chat")
        if rule.get("backendRefs") != [{"name": f"{name}-predictor", "port": 80}]:
            problems.append(f"{name}: the backend must be Service {name}-predictor, port 80")
        timeout = isvc["spec"]["predictor"].get("timeout", 60)
        if duration_s(rule.get("timeouts", {}).get("request", "0s")) < timeout:
            problems.append(f"{name}: the route's request timeout is shorter than the InferenceService's {timeout} s")
    return problems
