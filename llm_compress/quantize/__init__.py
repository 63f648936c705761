"""Post-training quantization: RTN, GPTQ or OSTQuant (+ RTN/GPTQ) at a W/A/KV setting.

- :mod:`llm_compress.quantize.setting`: "W4A4KV4"-style settings (no torch: the recipe schema uses it);
- :mod:`llm_compress.quantize.quantizers`, :mod:`rtn <llm_compress.quantize.rtn>`,
  :mod:`gptq <llm_compress.quantize.gptq>`, :mod:`ostquant <llm_compress.quantize.ostquant>` (with
  :mod:`transforms <llm_compress.quantize.transforms>`, :mod:`hadamard <llm_compress.quantize.hadamard>`,
  :mod:`qsur <llm_compress.quantize.qsur>`): the methods;
- :mod:`llm_compress.quantize.fakequant`: activation / KV fake quantization at run time;
- :mod:`llm_compress.quantize.apply`: quantize a model as a scheme says, and the stage's ``run``;
- :mod:`llm_compress.quantize.record`: ``quantization.json`` and re-creating its run-time parts on load.

Nothing is imported here, so ``import llm_compress.quantize.setting`` stays cheap.
"""
