"""The HTTP side, a package per wire protocol (``chat``: Kaito's /chat and KServe's :predict; ``openai``; ``v2``:
KServe's Open Inference Protocol), each with its schema, mapping onto generation options, routes and replies, beside
what they share (the ``kserve.Model``, strict JSON bodies, streaming, tracing, connections) and ``server``, which
wires them onto KServe's app. It drives the engine package and is never imported by it.
"""
