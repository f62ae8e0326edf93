"""The model: loading (``loading``), Falcon's forward over the project's KV cache, one step's inputs, eager or compiled
(``runner.Engine``)."""
