"""Post-training quantization: RTN, GPTQ or OSTQuant (+ RTN/GPTQ) at a W/A/KV setting.

- :mod:`stages.quantize.setting`: "W4A4KV4"-style settings (no torch: the recipe schema uses it);
- :mod:`stages.quantize.quantizers`, :mod:`rtn <stages.quantize.rtn>`, :mod:`gptq <stages.quantize.gptq>`,
  :mod:`ostquant <stages.quantize.ostquant>` (with :mod:`transforms <stages.quantize.transforms>`,
  :mod:`hadamard <stages.quantize.hadamard>`, :mod:`qsur <stages.quantize.qsur>`): the methods;
- :mod:`stages.quantize.fakequant`: activation / KV fake quantization at run time;
- :mod:`stages.quantize.apply`: quantize a model as a scheme says, and the stage's ``run``;
- :mod:`stages.quantize.record`: ``quantization.json`` and re-creating its run-time parts on load.

Nothing is imported here, so ``import stages.quantize.setting`` stays cheap.
"""
