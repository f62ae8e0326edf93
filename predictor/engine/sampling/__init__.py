"""Choosing tokens: each sequence's next token with its own options inside a shared batch, stop strings, grammars
(structured output), log-probabilities, and diverse beam search."""
