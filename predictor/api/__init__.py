"""The HTTP side: wire schemas, the request -> job mapping, the ``kserve.Model``, routes, streaming and the
OpenAI-compatible routes. It drives the engine package and is never imported by it.
"""
