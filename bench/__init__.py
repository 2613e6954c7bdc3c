"""Benchmarks against raw aio-pika and FastStream, measured in one run on one broker.

Every figure is reported as a ratio to a peer measured in the same process a
moment apart, because the machine is shared and noisy. ``make bench`` runs
them all; ``python -m bench.dispatch`` runs one.
"""
