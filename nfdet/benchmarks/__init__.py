"""The benchmarks of ``tools/benchmark.py`` and their shared machinery.

- ``nfdet.benchmarks.harness``: interleaved timing, peak memory, the machine's description,
  tables and JSON, shared by every subcommand;
- ``nfdet.benchmarks.backbone``: ``benchmark.py backbone``, nfdet's NFNet against timm's and
  torchvision's ResNet-50;
- ``nfdet.benchmarks.agc``: ``benchmark.py agc``, the cost of Adaptive Gradient Clipping;
- ``nfdet.benchmarks.data``: ``benchmark.py data``, the pretraining input pipeline's throughput
  per loader worker.

``benchmark.py detection`` lives beside the detectron2 code, in ``nfdet.detection.benchmark``,
and uses the harness from here. Benchmarks depend on the library, never the other way: no module
of ``nfdet.modeling``, ``nfdet.solver``, ``nfdet.checkpoint`` or ``nfdet.classification`` imports
this package, and importing the package itself imports none of its benchmarks.
"""
