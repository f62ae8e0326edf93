"""The OpenAI protocol: completions, chat completions, models, and vLLM's tokenizer routes."""
