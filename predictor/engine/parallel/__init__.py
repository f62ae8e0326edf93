"""Tensor parallelism: which part of each layer a rank keeps (``sharding``), the ranks, their process group and
rank 0's sending (``ranks``)."""
