"""Which model a set of CSKV factors belongs to: a hash of its k/v projections. A module of its own so that
:mod:`llm_compress.kv.spec` can check a spec against a model without importing the cache that uses the factors."""

from __future__ import annotations

import hashlib

import torch


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The Llama-layout attention modules of ``model`` (k_proj, v_proj and layer_idx), in layer order."""
    found = [m for m in model.modules() if hasattr(m, "k_proj") and hasattr(m, "v_proj") and hasattr(m, "layer_idx")]
    return sorted(found, key=lambda m: m.layer_idx)


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every layer's k_proj/v_proj parameters (floats as float32, others as stored): which model a set of
    factors was fitted on. The same weights loaded again (or in float32 and stored in float32) give the same hash."""
    h = hashlib.sha256()
    for attn in attention_modules(model):
        for proj in (attn.k_proj, attn.v_proj):
            for name, p in sorted(proj.named_parameters()):
                t = p.detach().cpu()
                t = t.float() if t.is_floating_point() else t
                h.update(f"{attn.layer_idx}.{name}{tuple(t.shape)}".encode())
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
