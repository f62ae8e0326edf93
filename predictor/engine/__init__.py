"""The engine: model loading, the Falcon forward and its KV cache, sampling, beam search, continuous batching.

It takes token ids and frozen ``GenerationOptions`` and returns plain dataclasses. It imports nothing of the HTTP
side (no ``kserve``, ``fastapi`` or ``pydantic``); ``tests/test_layers.py`` checks that.
"""
