"""Parallelism for LET-nGPT: tensor parallelism (tensor_parallel) and collective renormalisation (renorm)."""
