"""Quantized weights: the schemes this server runs, where each runs, and the linear layers that hold them."""
