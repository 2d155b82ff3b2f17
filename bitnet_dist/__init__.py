"""bitnet-dist: distributed training of BitNet v2 (ternary weights, 4/8-bit activations, H-BitLinear).

Subpackages: ``bitnet_dist.kernels`` (Triton kernels; the repository's top-level ``kernels/`` folder) and
``bitnet_dist.conf`` (Hydra configs; the top-level ``conf/`` folder), both mapped by pyproject.toml.
"""

__version__ = "0.2.0"
