"""The quantizer's own integer solution, kept next to the fake-quantized checkpoint: ``quant_codes.safetensors``.

The quantize stage stores dequantized weights (what evaluation runs); the packed exports (compressed-tensors, ONNX
MatMulNBits) must ship the integers that GPTQ / RTN / OSTQuant's weight quantizer chose, not a second rounding of
those weights onto another grid. So the stage also writes, per quantized Linear ``name`` (weight W [out, in]):

    name.codes  int8 [out, in] in [-2^(b-1), 2^(b-1) - 1] (symmetric) or uint8 [out, in] in [0, 2^b - 1]
    name.scale  float32 [out, groups]           (groups = in / group_size; 1 per output channel)
    name.zero   uint8 [out, groups]             (asymmetric only; symmetric grids have zero 0)

with W = (codes - zero) * scale, each scale/zero broadcast over its group of ``group_size`` consecutive input
columns, and the file's metadata: bits, group_size (0 = per channel), symmetric. Plain safetensors: no pickle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llm_compress.errors import InputError

CODES_FILE = "quant_codes.safetensors"


@dataclass(frozen=True)
class LayerCodes:
    codes: torch.Tensor  # [out, in] int8 / uint8
    scale: torch.Tensor  # [out, groups] float32
    zero: torch.Tensor | None  # [out, groups] uint8, None when symmetric

    def dequantize(self) -> torch.Tensor:
        """W = (codes - zero) * scale, float32 [out, in] (the arithmetic of ``quantizers.dequantize_codes``)."""
        out_f, in_f = self.codes.shape
        groups = self.scale.shape[1]
        q = self.codes.float().reshape(out_f, groups, in_f // groups)  # [out, groups, g]
        z = 0.0 if self.zero is None else self.zero.float()[..., None]
        return ((q - z) * self.scale[..., None]).reshape(out_f, in_f)


@dataclass(frozen=True)
class Codes:
    bits: int
    group_size: int | None  # None = per output channel
    symmetric: bool
    layers: dict[str, LayerCodes]


def save_codes(folder: Path, codes: dict, bits: int, group_size: int | None, symmetric: bool) -> Path:
    """Write ``codes`` ({name: (codes [out, in], scale, zero [out, groups, 1])}, as the quantizers fill it) to
    ``folder/CODES_FILE`` (through a temporary file)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, (c, scale, zero) in codes.items():
        tensors[f"{name}.codes"] = c.detach().cpu().contiguous()
        tensors[f"{name}.scale"] = scale[..., 0].detach().float().cpu().contiguous()
        if not symmetric:
            tensors[f"{name}.zero"] = zero[..., 0].detach().cpu().to(torch.uint8).contiguous()
    path = Path(folder) / CODES_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"bits": str(bits), "group_size": str(group_size or 0),
                                           "symmetric": str(bool(symmetric))})
    os.replace(tmp, path)
    return path


def load_codes(folder: Path) -> Codes | None:
    """The codes saved beside a quantized checkpoint, or None when the folder has none."""
    from safetensors import safe_open

    path = Path(folder) / CODES_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = sorted({k.rsplit(".", 1)[0] for k in f.keys()})
            bits, group, sym = int(meta["bits"]), int(meta["group_size"]), meta["symmetric"] == "True"
            layers = {n: LayerCodes(f.get_tensor(f"{n}.codes"), f.get_tensor(f"{n}.scale"),
                                    None if sym else f.get_tensor(f"{n}.zero")) for n in names}
    except Exception as e:  # noqa: BLE001 - a missing entry, or a file that is not safetensors
        raise InputError(f"{path}: not a valid codes file ({type(e).__name__}: {e})") from None
    return Codes(bits, group or None, sym, layers)
