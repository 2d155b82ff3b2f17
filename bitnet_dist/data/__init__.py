"""Data pipeline: the bundled Brown corpus, tokenizers, megatron indexed datasets and the loader.

Entry point for the train loop: ``build_data(cfg, run_dir, dp_rank=..., dp_size=...) -> DataBundle``.
Users' data: ``python -m bitnet_dist.data.preprocess`` (docs/data.md).
"""
from bitnet_dist.data.errors import DataError
from bitnet_dist.data.pipeline import DataBundle, build_data, check_data_config, padded_vocab_size, parse_blend

__all__ = ["DataBundle", "DataError", "build_data", "check_data_config", "padded_vocab_size", "parse_blend"]
