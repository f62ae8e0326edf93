"""The engine: model loading, the Falcon forward and its KV cache, sampling, beam search, continuous batching.

It takes token ids and frozen ``GenerationOptions`` and returns plain dataclasses. It imports nothing of the HTTP
side (no ``kserve``, ``fastapi`` or ``pydantic``). Its rooms, each importing only those before it
(``tests/test_layers.py`` checks both):

- ``options``, ``faults``: what every room shares (a job's frozen options; the test hook that raises at a stage);
- ``sampling/``: choosing each sequence's next token, stop strings, grammars, diverse beam search;
- ``lora/``: PEFT adapters read and checked, the bank of slots one step serves, Kaito's merged mix;
- ``model/``: loading, the Falcon forward and its KV cache, one step's inputs (``runner.Engine``);
- ``parallel/``: tensor parallelism, the shards and the ranks around an ``Engine``;
- ``scheduling/``: continuous batching, the running batch, tickets, health.
"""
