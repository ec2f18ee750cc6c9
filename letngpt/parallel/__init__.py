"""How the ranks are laid out and talk: process groups and the one all-reduce (distributed.py), the layout's
rules and derived numbers (layout.py: ParallelLayout), tensor parallelism applied to a built model
(tensor_parallel.py), and a collective counter for tests and benches (comm_counter.py).

May import letngpt's config, errors, data (its DataError only) and model (to shard it); never train, compare or
tools.
"""
