"""Serve the Falcon language models with KServe behind ``POST /chat``.

Modules, lowest first (imports flow one way): ``variants`` (the four Falcon checkpoints), ``schema`` (the /chat
wire format), ``options`` (request -> generation options), ``sampling`` and ``engine`` (tokens and tensors),
``batcher`` (continuous batching), ``model`` (the KServe model), ``server`` (HTTP routes), ``__main__``.
Importing this package does not import KServe.
"""
