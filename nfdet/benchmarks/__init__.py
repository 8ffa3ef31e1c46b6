"""Benchmarks that are not about one package module's speed alone (``tools/benchmark.py``).

- ``nfdet.benchmarks.data``: ``benchmark.py data``, the pretraining input pipeline's throughput
  per loader worker.

The library never imports this package: benchmarks depend on the library, not the other way.
"""
