#!/usr/bin/env bash
# Issue 17's GPU measurements in one run of about 8 minutes on one H200, each stage in its own time box:
#   benchmarks/gpu.sh             -> benchmarks/results/gpu-h200.{json,md}
#   benchmarks/gpu.sh --dry-run   -> every stage at tiny shapes on the CPU, about a minute (checks the script)
# Extra flags go to benchmarks/gpu_bench.py (--out FILE, --workdir DIR; --help lists them). No network is needed:
# the models are random weights at falcon-7b's and falcon-40b's real shapes, built on the device.
# When $OUT names a folder (the device machine's return folder), the results and server logs are copied there.
set -uo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

copy_out() {
    [[ -n "${OUT:-}" && -d "${OUT}" ]] || return 0
    cp benchmarks/results/gpu-h200.json benchmarks/results/gpu-h200.md "${OUT}/" 2>/dev/null
    cp "${PREDICTOR_CACHE:-${HOME}/.cache/falcon-predictor}"/gpu-bench/server-*.log "${OUT}/" 2>/dev/null
    return 0
}
trap copy_out EXIT

# The stages keep to 530 s between them; this is the backstop under the device's 600 s per command.
timeout -k 10 580 python benchmarks/gpu_bench.py "$@"
