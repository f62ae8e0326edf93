"""Write the documentation that is derived from the code, so that it cannot drift from it:

- ``docs/configuration.md``: every flag, from the parser in ``predictor/config.py`` (its groups, defaults and
  help), beside the value each manifest passes (``inferenceservices/``);
- the variants tables between ``<!-- generated: variants ... -->`` markers in ``README.md`` and
  ``inferenceservices/README.md``, from ``predictor/variants.py`` and the manifests' resources.

    python docs/generate.py            # rewrite them
    python docs/generate.py --check    # exit 1 naming the stale files (tests/test_docs.py runs this check)

A new flag lands in the reference by regenerating it: it appears in its argparse group with its help.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from predictor.config import (KSERVE_REFUSED_FLAGS, KSERVE_TRANSFORMER_FLAGS,  # noqa: E402
                              build_parser)
from predictor.variants import FALCON_CONTEXT_LENGTH, VARIANTS, Variant  # noqa: E402

MANIFESTS = ROOT / "inferenceservices"
CONFIGURATION = ROOT / "docs" / "configuration.md"
VARIANT_TABLES = {ROOT / "README.md": "brief", MANIFESTS / "README.md": "full"}
# GPUs of each size class the manifests name, as a reader shops for them
GPU_EXAMPLES = {24: "L4, A10G, A100, H100", 80: "A100, H100"}
# Environment variables the server reads, beside its flags
ENVIRONMENT = (
    ("PREDICTOR_API_KEY", "the key of `--api_key`, kept out of the process list and of `--help`"),
    ("HF_HUB_OFFLINE", "`1`: never reach the Hugging Face Hub; a pinned revision must be in the local cache "
                       "(the manifests set it: KServe's storage initializer fetched the weights)"),
    ("HF_HOME, HF_HUB_CACHE", "where the Hugging Face cache lives (a writable volume in the manifests)"),
    ("KSERVE_TLS_CERT_FILE, KSERVE_TLS_KEY_FILE", "KServe's fallbacks for `--ssl_certfile` and `--ssl_keyfile`"),
    ("<adapter folder name>", "the strength (0-1, default 1.0) of the adapter of that name in `--adapter_dir`"),
)


# ---- the manifests' arguments ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ManifestArgs:
    """The flags a set of manifests passes: to every model (``common``) and per model (``per_model``)."""

    common: dict[str, str]
    per_model: dict[str, dict[str, str]]
    only_when: dict[str, str] = dataclasses.field(default_factory=dict)  # flag: the condition it is passed under

    def value(self, flag: str) -> str:
        if flag in self.common:
            when = f" ({self.only_when[flag]})" if flag in self.only_when else ""
            return f"`{self.common[flag]}`{when}"
        values = {model: args[flag] for model, args in self.per_model.items() if flag in args}
        if not values:
            return ""
        if len(values) == len(self.per_model) and len(set(values.values())) == 1:
            return f"`{next(iter(values.values()))}`"
        by_value: dict[str, list[str]] = {}
        for model in self.per_model:
            by_value.setdefault(f"`{values[model]}`" if model in values else "default", []).append(model)
        return "; ".join(f"{', '.join(models)}: {value}" for value, models in by_value.items())


def flag_values(tokens: list[str]) -> dict[str, str]:
    """``--flag=value``, ``--flag value...`` and bare ``--flag`` tokens as {flag: value}."""
    values: dict[str, str] = {}
    flag = None
    for token in tokens:
        if token.startswith("--"):
            flag, _, value = token.partition("=")
            values[flag] = value or "(set)"
        elif flag is not None:
            values[flag] = token if values[flag] == "(set)" else f"{values[flag]} {token}"
    return values


def base_args() -> ManifestArgs:
    """``base/``: the ServingRuntime's container args, then each InferenceService's (KServe concatenates them)."""
    runtime = yaml.safe_load((MANIFESTS / "base" / "servingruntime.yaml").read_text())
    common = flag_values(runtime["spec"]["containers"][0]["args"])
    per_model = {}
    for name in VARIANTS:
        isvc = yaml.safe_load((MANIFESTS / "base" / f"{name}.yaml").read_text())
        per_model[name] = flag_values(isvc["spec"]["predictor"]["model"]["args"])
    return ManifestArgs(common, per_model)


def llm_inference_service_args() -> ManifestArgs:
    """``llm-inference-service/``: the preset's command line (its Go templates named in words, the TLS flags
    marked as TLS mode's), then each service's args."""
    preset = yaml.safe_load((MANIFESTS / "llm-inference-service" / "preset.yaml").read_text())
    script = preset["spec"]["template"]["containers"][0]["command"][2]
    script = script.replace("{{ .Spec.Model.Name }}", "<name>").replace("{{ .ObjectMeta.Namespace }}", "<namespace>")
    script = script.replace('"$@"', "")  # the service's own args follow, read below
    tls = re.search(r"\{\{ if \.GlobalConfig\.EnableTLS \}\}(.*?)\{\{ end \}\}", script, re.S)
    script = script.replace(tls.group(0), "")
    common, tls_flags = flag_values(script.split()), flag_values(tls.group(1).split())
    per_model = {}
    for name in VARIANTS:
        service = yaml.safe_load((MANIFESTS / "llm-inference-service" / f"{name}.yaml").read_text())
        per_model[name] = flag_values(service["spec"]["template"]["containers"][0].get("args", []))
    return ManifestArgs({**common, **tls_flags}, per_model, {flag: "TLS mode" for flag in tls_flags})


# ---- the configuration reference ------------------------------------------------------------------------------

def flag_names(action: argparse.Action) -> str:
    return " / ".join(f"`{name}`" for name in action.option_strings)


def default_of(action: argparse.Action) -> str:
    if action.default is None:
        return "none"
    if action.default == [] or action.default == ():
        return "none"
    if isinstance(action.default, bool) and isinstance(action, argparse.BooleanOptionalAction):
        return "on" if action.default else "off"
    return f"`{action.default}`"


def meaning(action: argparse.Action, help_text: str | None = None) -> str:
    text = help_text if help_text is not None else action.help or ""
    text = text % {**vars(action), "prog": "python -m predictor"}
    if action.choices:
        text += f" (one of {', '.join(f'`{choice}`' for choice in action.choices)})"
    return " ".join(text.split()).replace("|", "\\|")


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


INTRODUCTION = [
    "# Configuration reference",
    "",
    "<!-- Generated by `python docs/generate.py` from predictor/config.py and inferenceservices/: edit those, then "
    "regenerate. tests/test_docs.py fails while this file is stale. -->",
    "",
    "Every flag of `python -m predictor`, grouped as `--help` groups them, with its default and the value the "
    "manifests pass: `base/` is the ServingRuntime and InferenceServices that `kubectl apply -k inferenceservices/` "
    "deploys (the `autoscale/`, `inference-pool/`, `modelcar/` and `pvc/` overlays keep them; `adapters/` adds "
    "`--lora_modules`), `llm-inference-service/` the preset and LLMInferenceServices. An empty cell: the default "
    "applies. This server's switches come in pairs (`--compile` / `--no-compile`); KServe's take a value "
    "(`--enable_grpc false`).",
    "",
    "Where the manifests depart from the defaults, and why: `--device=cuda` (a GPU node without a GPU must fail, not "
    "load 80 GB on the CPU), `--request_timeout=600` (a 2,048-token generation on falcon-40b needs minutes), "
    "`--drain_timeout=660` (the gateway's timeout, after which nobody waits for an answer), `--max_batch_size=256` "
    "(the batch the autoscaling target is set for, on every GPU the manifests name), `--http_port=8000` in "
    "`llm-inference-service/` (KServe's contract), `--enable_grpc=false` everywhere (the default; kept so that the "
    "manifests say it).",
    "",
]
GRPC_NOTE = (
    "gRPC: with `--enable_grpc true` the server also listens on `--grpc_port` (8081) with KServe's v2 gRPC service "
    "(`inference.GRPCInferenceService`): `ServerLive`, `ServerReady`, `ModelReady` and `ModelMetadata` answer as the "
    "HTTP health routes do; `ModelInfer` is refused with `INVALID_ARGUMENT`, since text generation is served over "
    "HTTP only. It is off by default because nothing but a gRPC health check can use it, and an open port that "
    "cannot generate only confuses; no manifest opens it.")
HIDDEN_WHY = {
    **{flag: "read by a KServe transformer (a process that calls a predictor); this server is the predictor"
       for flag in KSERVE_TRANSFORMER_FLAGS},
    "--workers": "only 1 is accepted; any other number stops start-up in one line: more uvicorn workers would each "
                 "load the model and lose this server's routes (scale with replicas)",
}


def configuration_md() -> str:
    parser = build_parser()
    lines = INTRODUCTION + group_tables(parser, base_args(), llm_inference_service_args()) + hidden_table(parser)
    lines += ["", "## Environment", "", row(["variable", "meaning"]), row(["---"] * 2)]
    lines += [row([f"`{name}`", text]) for name, text in ENVIRONMENT]
    return "\n".join(lines) + "\n"


def group_tables(parser: argparse.ArgumentParser, base: ManifestArgs, llmis: ManifestArgs) -> list[str]:
    """A section per argparse group, in ``--help``'s order, of the flags ``--help`` shows."""
    lines = []
    for group in parser._action_groups:
        actions = [action for action in group._group_actions
                   if action.help != argparse.SUPPRESS and action.dest != "help"]
        if not actions:
            continue
        title = group.title if group.title.startswith("gRPC") else group.title[:1].upper() + group.title[1:]
        lines += [f"## {title}", "", row(["flag", "default", "`base/`", "`llm-inference-service/`", "meaning"]),
                  row(["---"] * 5)]
        for action in actions:
            flag = action.option_strings[0]
            lines.append(row([flag_names(action), default_of(action), base.value(flag), llmis.value(flag),
                              meaning(action)]))
        lines.append("")
        if group.title.startswith("gRPC"):
            lines += [GRPC_NOTE, ""]
    return lines


def hidden_table(parser: argparse.ArgumentParser) -> list[str]:
    """KServe's flags that ``--help`` hides, and why."""
    lines = ["## KServe's flags that do nothing here", "",
             "Accepted, because KServe's own parser reads the same command line, but hidden from `--help`:", "",
             row(["flag", "default", "why"]), row(["---"] * 3)]
    for flag in KSERVE_TRANSFORMER_FLAGS + KSERVE_REFUSED_FLAGS:
        action = parser._option_string_actions[flag]
        lines.append(row([flag_names(action), default_of(action), HIDDEN_WHY[flag]]))
    return lines


# ---- the variants tables --------------------------------------------------------------------------------------

def resources(name: str) -> dict[str, str]:
    isvc = yaml.safe_load((MANIFESTS / "base" / f"{name}.yaml").read_text())
    return isvc["spec"]["predictor"]["model"]["resources"]["requests"]


def gpus_that_fit(variant: Variant) -> str:
    size = f"{variant.gpus} x {variant.gpu_gb} GB" if variant.gpus > 1 else f"one of {variant.gpu_gb} GB or more"
    return f"{size}: {GPU_EXAMPLES[variant.gpu_gb]}"


def kv_per_token(variant: Variant) -> str:
    whole = f"{variant.kv_bytes_per_token // 1024} KiB"
    if variant.gpus == 1:
        return whole
    return f"{whole} ({variant.kv_bytes_per_token_per_gpu // 1024} KiB on each GPU)"


def variants_table(kind: str) -> str:
    if kind == "brief":
        lines = [row(["model", "GPUs", "GPU memory, at least", "GPUs that fit"]), row(["---"] * 4)]
        lines += [row([f"`{v.name}`", str(v.gpus), f"{v.gpu_memory_gib} GiB", gpus_that_fit(v)])
                  for v in VARIANTS.values()]
        return "\n".join(lines)
    lines = [row(["model", "GPUs", "GPU memory, at least", "GPUs that fit", "weights (bf16)", "KV cache per token",
                  f"full {FALCON_CONTEXT_LENGTH:,}-token sequences the default cache holds (estimate)",
                  "host memory", "node disk (`hf://`)"]),
             row(["---"] * 9)]
    for v in VARIANTS.values():
        weights = f"{v.weights_gb:.1f} GB"
        if v.gpus > 1:
            weights += f" ({v.weights_per_gpu_gb:.1f} GB on each GPU)"
        requests = resources(v.name)
        lines.append(row([f"`{v.name}`", str(v.gpus), f"{v.gpu_memory_gib} GiB", gpus_that_fit(v), weights,
                          kv_per_token(v), f"~{v.kv_rows:,}", requests["memory"], requests["ephemeral-storage"]]))
    return "\n".join(lines)


def with_variant_tables(text: str) -> str:
    """``text`` with each ``<!-- generated: variants KIND -->`` ... ``<!-- end generated -->`` block rewritten."""
    def replace(match: re.Match) -> str:
        return f"{match.group(1)}\n{variants_table(match.group(2))}\n{match.group(3)}"

    return re.sub(r"(<!-- generated: variants (\w+) -->)\n.*?\n(<!-- end generated -->)", replace, text, flags=re.S)


# ---- writing and checking -------------------------------------------------------------------------------------

def generated() -> dict[Path, str]:
    files = {CONFIGURATION: configuration_md()}
    for path in VARIANT_TABLES:
        files[path] = with_variant_tables(path.read_text())
    return files


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--check", action="store_true", help="exit 1 if a generated file is stale; write nothing")
    check = args.parse_args(argv).check
    stale = [path for path, text in generated().items() if not path.exists() or path.read_text() != text]
    if check:
        for path in stale:
            print(f"{path} is stale: run python docs/generate.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in generated().items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
