"""Prometheus metrics, served by KServe's ``GET /metrics`` from the default registry.

Names follow vLLM's where a cluster's tooling reads them (the Gateway API Inference Extension's model server
protocol: the names may differ, the types and meanings may not). The "Metrics" table of docs/operations.md maps
each one to its vLLM counterpart. The request-level ones are recorded by the engine's ``Ticket``, which every route's request
passes through, streamed or not.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

_TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_SECOND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Time per output token: decode steps are ~1 ms (tiny model on a CPU) to ~100 ms (falcon-40b over two GPUs).
_HOST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)

REQUESTS = Counter("falcon_requests_total", "Generation requests by route and outcome "
                   "(success, cancelled, overloaded, or the error type)", ["route", "outcome"])

# -- per request, observed once it is answered ------------------------------------------------------------------
QUEUE_SECONDS = Histogram("falcon_queue_seconds", "Time a request waited before generation started",
                          buckets=_SECOND_BUCKETS)
GENERATION_SECONDS = Histogram("falcon_generation_seconds", "Time spent generating for a request",
                               buckets=_SECOND_BUCKETS)
TIME_TO_FIRST_TOKEN = Histogram("falcon_time_to_first_token_seconds",
                                "Time from a request's arrival at the engine to its first generated token",
                                buckets=_SECOND_BUCKETS)
TIME_PER_OUTPUT_TOKEN = Histogram("falcon_time_per_output_token_seconds",
                                  "Mean time between a request's generated tokens after the first (not observed "
                                  "for beam search, whose tokens all arrive at the end)", buckets=_STEP_BUCKETS)
E2E_SECONDS = Histogram("falcon_e2e_request_latency_seconds",
                        "Time from a request's arrival at the engine to its answer", buckets=_SECOND_BUCKETS)
REQUEST_PROMPT_TOKENS = Histogram("falcon_request_prompt_tokens", "Prompt tokens per request",
                                  buckets=_TOKEN_BUCKETS)
REQUEST_GENERATION_TOKENS = Histogram("falcon_request_generation_tokens",
                                      "Generated tokens per request (all sequences)", buckets=_TOKEN_BUCKETS)
STEP_HOST_SECONDS = Histogram("falcon_step_host_seconds", "Host time of one decode-worker step: its wall time less "
                              "its wait for the device (on a CPU the forward's compute counts here too)",
                              buckets=_HOST_BUCKETS)
STEP_DEVICE_WAIT_SECONDS = Histogram("falcon_step_device_wait_seconds", "Time one decode-worker step waited for "
                                     "the device, reading its tokens back", buckets=_HOST_BUCKETS)
# Speculative decoding (vLLM's four counters under this server's prefix); drafts are verified in the decode step
SPEC_DECODE_DRAFTS = Counter("falcon_spec_decode_num_drafts", "Drafts verified (one per sequence and step that "
                             "drafted)")
SPEC_DECODE_DRAFT_TOKENS = Counter("falcon_spec_decode_num_draft_tokens", "Draft tokens verified")
SPEC_DECODE_ACCEPTED_TOKENS = Counter("falcon_spec_decode_num_accepted_tokens", "Draft tokens accepted")
SPEC_DECODE_ACCEPTED_PER_POSITION = Counter("falcon_spec_decode_num_accepted_tokens_per_pos",
                                            "Draft tokens accepted at each position of their draft (0: first)",
                                            ["position"])
SPEC_DECODE_DRAFT_LENGTH = Gauge("falcon_spec_decode_draft_length", "Mean draft tokens a running sequence asked "
                                 "for in the last step (0: no speculation, e.g. above disable_by_batch_size)")
PROMPT_TOKENS = Counter("falcon_prompt_tokens_total", "Prompt tokens of the requests answered")
GENERATION_TOKENS = Counter("falcon_generation_tokens_total", "Tokens generated for the requests answered")

# -- the engine now ---------------------------------------------------------------------------------------------
WAITING = Gauge("falcon_waiting_requests", "Requests queued for a batch slot")
RUNNING = Gauge("falcon_running_sequences", "Sequences in the running batch")
RUNNING_REQUESTS = Gauge("falcon_running_requests", "Requests being generated (each may have several sequences)")
KV_CACHE_USAGE = Gauge("falcon_kv_cache_usage_ratio", "Share of the reserved KV cache (tokens) that running "
                       "sequences hold, 0-1")
CACHE_CONFIG = Gauge("falcon_cache_config_info", "The KV cache's layout: block size of the prefix index (tokens) "
                     "and the reserved tokens in blocks of that size", ["block_size", "num_gpu_blocks"])
PREFIX_CACHE_QUERIES = Counter("falcon_prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
PREFIX_CACHE_HITS = Counter("falcon_prefix_cache_hits", "Prompt tokens whose keys and values were reused from the "
                            "prefix cache instead of computed")

# -- LoRA adapters ----------------------------------------------------------------------------------------------
LORA_REQUESTS = Counter("falcon_lora_requests", "Requests started with each LoRA adapter", ["adapter"])


class LoraRequestsInfo:
    """``falcon_lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}``, vLLM's
    ``vllm:lora_requests_info``: the adapters running requests use and those queued requests wait for (each
    comma-separated), the adapters one step serves; the value is the time of the update, read at each scrape (the
    Inference Extension's LoRA-affinity scorer reads the labels). No sample while no adapters are served by name."""

    def __init__(self) -> None:
        self.source: Callable[[], tuple[list[str], list[str], int]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("falcon_lora_requests_info", "Running and waiting LoRA adapters (labels); value: "
                                   "time of the update", labels=["running_lora_adapters", "waiting_lora_adapters",
                                                                  "max_lora"])
        if self.source is not None:
            running, waiting, max_lora = self.source()
            family.add_metric([",".join(running), ",".join(waiting), str(max_lora)], time.time())
        yield family


LORA_INFO = LoraRequestsInfo()
REGISTRY.register(LORA_INFO)
