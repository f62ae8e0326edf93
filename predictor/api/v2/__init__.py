"""KServe's Open Inference Protocol (v2): text generation on /v2/models/<name>/infer."""
