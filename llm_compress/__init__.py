"""Compression stages: plain Python/PyTorch, importable and testable without Prefect.

One module (or package) per technique: :mod:`llm_compress.dsir`, :mod:`llm_compress.distill`,
:mod:`llm_compress.quantize`, ...
Each stage of the chain is declared once, in its own module under :mod:`llm_compress.pipeline`, as a
:class:`llm_compress.stage.Stage` (name, folder number, recipe sections, inputs, checks, run); the registry is
:data:`llm_compress.pipeline.STAGES`. :mod:`llm_compress.runner` wraps a stage's run with the manifest, the
content-addressed cache and the atomic write. The recipe schema is :mod:`llm_compress.config`.
"""

__version__ = "0.1.0"
