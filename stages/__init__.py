"""Compression stages: plain Python/PyTorch, importable and testable without Prefect.

One module (or package) per technique: :mod:`stages.dsir`, :mod:`stages.distill`, :mod:`stages.quantize`, ...
Each stage of the chain is declared once, in its own module under :mod:`stages.pipeline`, as a
:class:`stages.stage.Stage` (name, folder number, recipe sections, inputs, checks, run); the registry is
:data:`stages.pipeline.STAGES`. :mod:`stages.runner` wraps a stage's run with the manifest, the content-addressed
cache and the atomic write. The recipe schema is :mod:`stages.config`.
"""

__version__ = "0.1.0"
