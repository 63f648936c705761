"""Which model layouts the transform-based parts handle (no torch: recipe checks read it before any work).

OSTQuant's transforms and the run-time activation / KV fake quantization rewrite Llama-style decoder layers
(q/k/v/o, gate/up/down, RMSNorm, RoPE); other layouts are refused by name before work starts.
"""

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
