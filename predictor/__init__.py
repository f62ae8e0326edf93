"""Serve the Falcon language models with KServe behind ``POST /chat``.

Two packages, imports flowing one way: ``engine`` (model, KV cache, sampling, batching; no HTTP) and ``api``
(wire formats, routes, the KServe model), which uses it. Beside them: ``variants`` (the four Falcon checkpoints),
``errors``, ``metrics``, ``tiny`` (tiny checkpoints built locally), ``config`` and ``__main__`` (start-up).
Importing this package does not import KServe.
"""
