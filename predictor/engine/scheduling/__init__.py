"""Scheduling: the queues and worker threads (``batcher``), the running batch and its step (``decoding``), admitted
requests (``running``), tickets as the client and the worker see them, the engine's health."""
