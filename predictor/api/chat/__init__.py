"""Kaito's /chat protocol (also KServe's v1 :predict): its wire format, its mapping onto generation, its routes."""
