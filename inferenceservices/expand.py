#!/usr/bin/env python3
"""Rewrite InferenceServices that name a ServingRuntime into the other form: the container spelled out.

KServe builds the predictor pod of a ``predictor.model`` InferenceService by merging it into the ServingRuntime it
names (``MergeRuntimeContainers`` and ``MergePodSpec`` in kserve's
pkg/controller/v1beta1/inferenceservice/utils/utils.go). This script does the same merge offline, so the container is
written once, in base/servingruntime.yaml, and the explicit form is derived from it rather than copied by hand::

    kubectl kustomize inferenceservices/ | python inferenceservices/expand.py | kubectl apply -f -
    python inferenceservices/expand.py inferenceservices/base/{servingruntime,falcon-7b}.yaml   # or files

Runtimes that the rewritten InferenceServices used are left out of the output; other documents pass through. The
tests use the same merge to check what each pod will really run.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Iterable

import yaml

CONTAINER_NAME = "kserve-container"  # the runtime container KServe merges the InferenceService into
RUNTIME_KINDS = ("ServingRuntime", "ClusterServingRuntime")
# ModelSpec fields that are not Container fields: KServe reads them and they never reach the pod.
MODEL_ONLY_FIELDS = ("modelFormat", "runtime", "runtimeVersion", "protocolVersion", "storageUri", "storage")
# The ServingRuntime pod fields that MergePodSpec carries into the pod.
RUNTIME_POD_FIELDS = ("nodeSelector", "affinity", "tolerations", "volumes", "imagePullSecrets", "schedulerName",
                      "resourceClaims")
# patchMergeKey of the core/v1 lists in a Container or PodSpec; any other list is replaced by the patch's.
MERGE_KEYS = {"containers": "name", "env": "name", "imagePullSecrets": "name", "ports": "containerPort",
              "resourceClaims": "name", "volumeDevices": "devicePath", "volumeMounts": "mountPath", "volumes": "name"}
RETAIN_KEYS = ("volumes", "resourceClaims")  # patchStrategy "merge,retainKeys": a patched item keeps only its keys

Doc = dict[str, Any]


def strategic_merge(base: Any, patch: Any) -> Any:
    """Kubernetes' strategic merge patch, as far as a Container or a PodSpec needs it."""
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif key in MERGE_KEYS and isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = _merge_list(merged[key], value, MERGE_KEYS[key], retain_keys=key in RETAIN_KEYS)
        else:
            merged[key] = strategic_merge(merged.get(key), value)
    return merged


def _merge_list(base: list[Doc], patch: list[Doc], merge_key: str, *, retain_keys: bool) -> list[Doc]:
    merged = copy.deepcopy(base)
    for item in patch:
        index = next((i for i, old in enumerate(merged) if old.get(merge_key) == item.get(merge_key)), None)
        if index is None:
            merged.append(copy.deepcopy(item))
            continue
        old = {k: v for k, v in merged[index].items() if k in item} if retain_keys else merged[index]
        merged[index] = strategic_merge(old, item)
    return merged


def merge_container(runtime_container: Doc, model: Doc) -> Doc:
    """The container KServe runs: the model's container fields over the runtime's, args concatenated."""
    model_container = {k: v for k, v in model.items() if k not in MODEL_ONLY_FIELDS}
    merged = strategic_merge(runtime_container, model_container)
    merged["name"] = merged.get("name") or runtime_container["name"]
    args = list(runtime_container.get("args", [])) + list(model.get("args", []))
    if args:
        merged["args"] = args
    return merged


def find_runtime(model: Doc, runtimes: dict[str, Doc]) -> Doc:
    """The runtime the model names, or the first that auto-selects for its model format."""
    if model.get("runtime"):
        if model["runtime"] not in runtimes:
            raise ValueError(f"no ServingRuntime named {model['runtime']!r}")
        return runtimes[model["runtime"]]
    format_name = (model.get("modelFormat") or {}).get("name")
    for runtime in runtimes.values():
        for supported in runtime["spec"].get("supportedModelFormats", []):
            if supported.get("name") == format_name and supported.get("autoSelect"):
                return runtime
    raise ValueError(f"no ServingRuntime auto-selects model format {format_name!r}")


def explicit_predictor(isvc: Doc, runtimes: dict[str, Doc]) -> Doc:
    """The InferenceService's predictor with the runtime merged in: ``containers`` instead of ``model``."""
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    runtime_spec = find_runtime(model, runtimes)["spec"]
    runtime_containers = runtime_spec.get("containers", [])
    base = next((c for c in runtime_containers if c.get("name") == CONTAINER_NAME), None)
    if base is None:
        raise ValueError(f"the runtime has no container named {CONTAINER_NAME!r}")
    container = merge_container(base, model)
    if model.get("storageUri"):
        # A custom container asks for the storage initializer through this variable.
        container = strategic_merge(container, {"env": [{"name": "STORAGE_URI", "value": model["storageUri"]}]})
    pod = {k: runtime_spec[k] for k in RUNTIME_POD_FIELDS if k in runtime_spec}
    explicit = strategic_merge(pod, {k: v for k, v in predictor.items() if k != "model"})
    explicit["containers"] = [container] + [c for c in runtime_containers if c.get("name") != CONTAINER_NAME]
    return explicit


def expand(docs: Iterable[Doc]) -> list[Doc]:
    """Every runtime-based InferenceService in ``docs`` rewritten with its container spelled out."""
    docs = [d for d in docs if d]
    runtimes = {d["metadata"]["name"]: d for d in docs if d.get("kind") in RUNTIME_KINDS}
    used: set[str] = set()
    out = []
    for doc in docs:
        if doc.get("kind") == "InferenceService" and "model" in doc["spec"].get("predictor", {}):
            used.add(find_runtime(doc["spec"]["predictor"]["model"], runtimes)["metadata"]["name"])
            doc = copy.deepcopy(doc)
            doc["spec"]["predictor"] = explicit_predictor(doc, runtimes)
        out.append(doc)
    return [d for d in out if not (d.get("kind") in RUNTIME_KINDS and d["metadata"]["name"] in used)]


def main(argv: list[str]) -> None:
    texts = [open(path, encoding="utf-8").read() for path in argv] if argv else [sys.stdin.read()]
    docs = [doc for text in texts for doc in yaml.safe_load_all(text)]
    yaml.safe_dump_all(expand(docs), sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main(sys.argv[1:])
