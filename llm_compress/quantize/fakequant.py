"""Activation and KV-cache fake quantization hooks for Llama-family transformers models (llama, mistral, qwen2).

``attach_fake_quant(model, setting)`` simulates a WxAyKVz setting on a model whose weights are already
(fake-)quantized or not:
- Activations: the input of every nn.Linear inside the decoder layers (q/k/v/o/gate/up/down_proj; never lm_head)
  is fake-quantized per token over the hidden dim, ``setting.a_bits``, by a forward pre-hook. Optionally the o_proj
  input (the P·V output, [.., heads * head_dim]) uses groups, e.g. one per head as QuaRot does. A down_proj with an
  online Hadamard (``transforms.HadamardInputLinear``) multiplies x @ H: there the Hadamard's output is quantized
  (a forward hook on the OnlineHadamard module all layers share), i.e. what the matmul sees.
- KV cache: keys (after RoPE) and values [batch, n_kv_heads, seq, head_dim] are fake-quantized per (batch, head,
  token), asymmetric by default, in groups along head_dim (default: one group = the whole head), right before the
  attention product. This is done by an attention function registered with transformers' AttentionInterface that
  quantizes key/value and then calls the model's original attention implementation (sdpa, eager, ...). During
  generation the cache keeps fp keys/values and each step re-quantizes them; per-token quantization is token-local
  and deterministic, so that equals quantizing each token once when it enters the cache.

How the attention function is chosen in transformers 4.57: ``LlamaAttention.forward`` reads
``self.config._attn_implementation`` on every call; "eager" means the module's own ``eager_attention_forward``,
anything else is looked up in ``ALL_ATTENTION_FUNCTIONS``. The attention mask is built by ``create_causal_mask``,
which looks the same name up in ``ALL_MASK_ATTENTION_FUNCTIONS`` and, for a name it does not know, returns the raw
2-D mask (or None) unprocessed. So a new name needs both an attention function and a mask function (the original
implementation's) registered. The modules share ``model.config``; setting it switches every layer.

With gradients on, the quantizers pass the rounding straight through (``quantizers.fake_quant_round_ste``), so
transforms can be trained with the hooks attached.
``remove()`` on the returned handle (or leaving its ``with`` block) undoes everything.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable

import torch
from torch import nn

from llm_compress.errors import InputError
from llm_compress.quantize.quantizers import NO_QUANT_BITS, QuantSetting, fake_quant_kv, fake_quant_per_token
from llm_compress.quantize.support import SUPPORTED_MODEL_TYPES
_KV_ATTR = "_fakequant_kv"  # on attention modules: (bits, group_size, symmetric) while attached
_ATTN_PREFIX = "fakequant_kv_"


def _original_attention(impl: str, module: nn.Module) -> Callable:
    """The attention function that ``impl`` selects for ``module`` (mirrors the model's own dispatch)."""
    if impl == "eager":
        return getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[impl]


def _register_kv_attention(impl: str) -> str:
    """Register (idempotently) an attention function that fake-quantizes K/V then runs ``impl``; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = _ATTN_PREFIX + impl

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs):
        # query [B, n_heads, Lq, d]; key, value [B, n_kv_heads, Lk, d], key already RoPE-rotated
        cfg = getattr(module, _KV_ATTR, None)
        if cfg is not None and cfg[3].active:
            bits, group_size, symmetric, _ = cfg
            key = fake_quant_kv(key, bits, group_size, symmetric)
            value = fake_quant_kv(value, bits, group_size, symmetric)
        return _original_attention(impl, module)(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    if impl in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name


class FakeQuantHandle:
    """Undo handle of ``attach_fake_quant``: ``remove()`` or use as a context manager."""

    def __init__(self, model: nn.Module, setting: QuantSetting):
        self.model = model
        self.setting = setting
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._attn_modules: list[nn.Module] = []
        self._configs: list[tuple[object, str]] = []  # (config, original _attn_implementation)
        self.removed = False
        self.active = True  # False inside ``paused()``: every quantizer passes its input through

    @contextlib.contextmanager
    def paused(self):
        """Run the model in full precision for a while (e.g. the teacher pass of a calibration step)."""
        before, self.active = self.active, False
        try:
            yield self
        finally:
            self.active = before

    def remove(self) -> None:
        if self.removed:
            return
        for h in self._hooks:
            h.remove()
        for m in self._attn_modules:
            if hasattr(m, _KV_ATTR):
                delattr(m, _KV_ATTR)
        for cfg, impl in reversed(self._configs):
            cfg._attn_implementation = impl
        if getattr(self.model, "_fakequant_handle", None) is self:
            del self.model._fakequant_handle
        self.removed = True

    def __enter__(self) -> FakeQuantHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach_fake_quant(model: nn.Module, setting: QuantSetting, *, a_clip_ratio: float = 1.0,
                      kv_group_size: int | None = None, o_proj_group_size: int | None = None) -> FakeQuantHandle:
    """Install per-token activation and KV-cache fake quantization on a llama/mistral/qwen2 model; see module doc."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"fake quantization supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
                         f"got {model_type!r}")
    if getattr(model, "_fakequant_handle", None) is not None:
        raise InputError("fake quantization is already attached to this model; remove() the first handle")
    layers = model.model.layers
    # Validate the arguments now (on dummies), not at the first forward and before anything is installed.
    if setting.a_bits < NO_QUANT_BITS:
        d_model = layers[0].self_attn.o_proj.in_features
        fake_quant_per_token(torch.zeros(1, d_model), setting.a_bits, setting.a_symmetric, a_clip_ratio,
                             o_proj_group_size)
    if setting.kv_bits < NO_QUANT_BITS:
        if (model.config._attn_implementation or "").startswith(_ATTN_PREFIX):
            raise InputError("KV fake quantization is already active on this model")
        fake_quant_kv(torch.zeros(1, 1, 1, layers[0].self_attn.head_dim), setting.kv_bits, kv_group_size,
                      setting.kv_symmetric)
    handle = FakeQuantHandle(model, setting)

    if setting.a_bits < NO_QUANT_BITS:
        quant = functools.partial(_act_quant, handle, setting.a_bits, setting.a_symmetric, a_clip_ratio)
        onlines: dict[int, nn.Module] = {}
        for layer in layers:
            for name, mod in layer.named_modules():
                if not isinstance(mod, nn.Linear):
                    continue
                online = getattr(mod, "online_hadamard", None)
                if online is not None:  # the matmul sees x @ H: quantize the online Hadamard's output (below)
                    onlines[id(online)] = online
                    continue
                q = quant(o_proj_group_size if name.endswith("o_proj") else None)
                handle._hooks.append(mod.register_forward_pre_hook(lambda m, args, q=q: (q(args[0]), *args[1:])))
        # One OnlineHadamard module is shared by every layer's down_proj, so its hook is registered once.
        for online in onlines.values():
            handle._hooks.append(online.register_forward_hook(lambda m, args, out, q=quant(None): q(out)))

    if setting.kv_bits < NO_QUANT_BITS:
        name = _register_kv_attention(model.config._attn_implementation or "eager")
        for layer in layers:
            setattr(layer.self_attn, _KV_ATTR, (setting.kv_bits, kv_group_size, setting.kv_symmetric, handle))
            handle._attn_modules.append(layer.self_attn)
        configs = [model.config] + [lay.self_attn.config for lay in layers if lay.self_attn.config is not model.config]
        for cfg in {id(c): c for c in configs}.values():
            handle._configs.append((cfg, cfg._attn_implementation))
            cfg._attn_implementation = name

    model._fakequant_handle = handle
    return handle


def _act_quant(handle: FakeQuantHandle, bits: int, symmetric: bool, clip_ratio: float, group_size: int | None):
    """Per-token fake quantization of a matmul input [..., in_features], a pass-through while the handle is paused."""
    def quant(x: torch.Tensor) -> torch.Tensor:
        return fake_quant_per_token(x, bits, symmetric, clip_ratio, group_size) if handle.active else x
    return quant
