"""Loading and saving models and tokenizers, local or from the hub, safely.

- Weights are read from safetensors only (``use_safetensors=True``): no pickle of a file we did
  not write is ever unpickled.
- ``trust_remote_code`` is off unless the recipe turns it on.
- A reference is a local directory if one exists at that path (or it looks like a path); otherwise
  a hub id ``org/name``. On machines without internet, a hub id that is not in the local HF cache
  fails with an InputError that says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llm_compress.errors import InputError
from llm_compress.refs import check_model_ref, is_local_ref  # noqa: F401  (re-exported: the loaders' callers use them)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("runtime.device is 'cuda' but no CUDA device is available")
    return torch.device(device)


def _hub_error(ref: str, what: str, err: Exception) -> InputError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE=1 is set)" if offline else " (no internet, or not a model on the hub?)"
    return InputError(f"{what}: could not load '{ref}' from the hub{hint}: {type(err).__name__}: {err}")


def load_tokenizer(ref: str, *, trust_remote_code: bool = False, revision: str | None = None, what: str = "tokenizer"):
    from transformers import AutoTokenizer

    if is_local_ref(ref) and not Path(ref).expanduser().exists():
        raise InputError(f"{what}: not found: {ref}")
    try:
        tok = AutoTokenizer.from_pretrained(str(Path(ref).expanduser()) if is_local_ref(ref) else ref,
                                            trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        if is_local_ref(ref):
            raise InputError(f"{what}: cannot load a tokenizer from {ref}: {e}") from None
        raise _hub_error(ref, what, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(ref: str, *, dtype: str = "float32", device: str | torch.device = "cpu",
                   trust_remote_code: bool = False, revision: str | None = None, what: str = "model"):
    """Load a causal LM for training/evaluation (eval mode, given dtype, on device)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    config = None
    if is_local_ref(ref):
        check_model_ref(ref, what)  # also: every safetensors file whole (a truncated one fails here, named)
        from llm_compress.quantize.record import runtime_checkpoint_config

        config = runtime_checkpoint_config(Path(ref).expanduser())  # an export that refuses stock loaders
    try:
        extra = {"config": config} if config is not None else {}
        model = AutoModelForCausalLM.from_pretrained(
            str(Path(ref).expanduser()) if is_local_ref(ref) else ref, dtype=DTYPES[dtype],
            use_safetensors=True, trust_remote_code=trust_remote_code, revision=revision, **extra)
    except SafetensorError as e:  # a header whose offsets do not fit its shapes: what check_model_ref cannot see
        raise InputError(f"{what}: truncated or corrupt safetensors file in {ref}: {e}") from None
    except (OSError, ValueError, EnvironmentError) as e:
        if is_local_ref(ref):
            raise InputError(f"{what}: cannot load {ref}: {e}") from None
        raise _hub_error(ref, what, e) from None
    if is_local_ref(ref):  # a quantized checkpoint: re-create its run-time parts (online Hadamard, A/KV bits)
        from llm_compress.quantize.record import restore

        restore(model, Path(ref).expanduser())
    return model.to(device).eval()


def free_device(device: torch.device) -> None:
    """Give a dropped model's GPU memory back before the next one loads (on CPU refcounting suffices,
    and a full gc.collect costs ~0.4 s per call with torch + transformers imported)."""
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def vocab_size_of(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def check_same_vocab(teacher, student, teacher_tok=None, student_tok=None) -> None:
    """Teacher and student must share a vocabulary (cross-tokenizer KD is not supported)."""
    tv, sv = vocab_size_of(teacher), vocab_size_of(student)
    if tv != sv:
        raise InputError(f"vocabulary mismatch: teacher has {tv} output tokens, student has {sv}; "
                         "teacher and student must share a tokenizer")
    if teacher_tok is not None and student_tok is not None and teacher_tok.get_vocab() != student_tok.get_vocab():
        raise InputError("vocabulary mismatch: teacher and student tokenizers map tokens to "
                         "different ids; they must share a tokenizer")


def save_pretrained_atomic_into(model, tokenizer, out_dir: str | Path) -> None:
    """Save model (safetensors) and tokenizer into ``out_dir`` (already a temporary stage dir)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
