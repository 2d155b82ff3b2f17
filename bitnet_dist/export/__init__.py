"""A trained model leaves the trainer: Hugging Face export, text generation and evaluation (docs/export.md).

* ``bitnet_dist.export.hf``: ``export(checkpoint, out)`` and the ``bitnet-export`` command;
* ``bitnet_dist.export.generate``: ``bitnet-generate`` (KV-cache sampling from a checkpoint or an export);
* ``bitnet_dist.export.evaluate``: ``bitnet-eval`` (perplexity of a checkpoint or an export);
* ``bitnet_dist.export.reader``: checkpoints of either engine at any layout -> one TP=1 state dict;
* ``modeling_bitnet_v2.py``: the modeling code shipped inside v2 exports (plain torch + transformers).

This package imports the model, layers and engines' checkpoint formats; nothing in bitnet_dist imports it
except its own entry points. transformers, safetensors and lm-eval come with the ``hf`` extra.
"""
