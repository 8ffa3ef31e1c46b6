"""nfdet: Normalizer-Free Networks (NFNets) as detectron2 backbones."""

__version__ = "0.1.0"
