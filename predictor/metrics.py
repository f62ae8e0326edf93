"""Prometheus metrics, served by KServe's ``GET /metrics`` from the default registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_SECOND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("falcon_requests_total", "Generation requests by route and outcome "
                   "(success, cancelled, overloaded, or the error type)", ["route", "outcome"])
QUEUE_SECONDS = Histogram("falcon_queue_seconds", "Time a request waited before generation started",
                          buckets=_SECOND_BUCKETS)
GENERATION_SECONDS = Histogram("falcon_generation_seconds", "Time spent generating for a request",
                               buckets=_SECOND_BUCKETS)
PROMPT_TOKENS = Histogram("falcon_prompt_tokens", "Prompt tokens per request", buckets=_TOKEN_BUCKETS)
GENERATED_TOKENS = Histogram("falcon_generated_tokens", "Generated tokens per request (all sequences)",
                             buckets=_TOKEN_BUCKETS)
WAITING = Gauge("falcon_waiting_requests", "Requests queued for a batch slot")
RUNNING = Gauge("falcon_running_sequences", "Sequences in the running batch")
KV_CACHE_USAGE = Gauge("falcon_kv_cache_usage_ratio", "Share of the reserved KV cache (tokens) that running "
                       "sequences hold, 0-1")
CACHE_CONFIG = Gauge("falcon_cache_config_info", "The KV cache's layout: block size of the prefix index (tokens) "
                     "and the reserved tokens in blocks of that size", ["block_size", "num_gpu_blocks"])
PREFIX_CACHE_QUERIES = Counter("falcon_prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
PREFIX_CACHE_HITS = Counter("falcon_prefix_cache_hits", "Prompt tokens whose keys and values were reused from the "
                            "prefix cache instead of computed")
