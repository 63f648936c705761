"""Compression stages: plain Python/PyTorch, importable and testable without Prefect.

One module per technique. A stage is a function ``run(cfg, inputs, out_dir, ctx) -> StageResult``:
it takes its typed config (from :mod:`stages.config`) and input paths, writes only inside
``out_dir`` and returns output paths plus metrics. :mod:`stages.runner` wraps it with the manifest,
the content-addressed cache key and the atomic write.
"""

__version__ = "0.1.0"
