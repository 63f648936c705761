"""KV-cache compression as Hugging Face caches: one file per method behind ``stages.kv.base`` (``KVCache``/``KVLayer``).

Nothing heavy is imported here: ``stages.kv.spec`` validates settings without torch.
"""
