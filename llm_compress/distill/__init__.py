"""Knowledge distillation: the stage's entry (:mod:`llm_compress.distill.apply`: derive or load the student, run the
trainer, save), the training loop (:mod:`~llm_compress.distill.trainer`), the losses (:mod:`~llm_compress.distill.step`,
:mod:`~llm_compress.distill.divergences`, :mod:`~llm_compress.distill.chunked`) and the recipe section
(:mod:`~llm_compress.distill.config`, torch-free: this package's ``__init__`` imports nothing, so validating a recipe
never loads torch)."""
