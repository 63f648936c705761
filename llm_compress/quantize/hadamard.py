"""Hadamard and random orthogonal matrices, and an online Hadamard module.

Conventions:
- Every matrix returned here is *normalised*: H is [n, n] with H @ H.T = I (entries +-1/sqrt(n) for Hadamards).
- Activations are row vectors: a transform is applied as ``x @ H`` on the last dimension.
- ``hadamard_matrix(n)`` exists for n = 2^a * m where m is 1, 2, or the order of a Paley Hadamard matrix:
  Paley I (m - 1 a prime q with q = 3 mod 4) or Paley II (m / 2 - 1 a prime q with q = 1 mod 4). Every split
  n = 2^a * m is tried, so e.g. 4864 = 256 * 19 is built as 8 * 608 (607 is prime, 607 = 3 mod 4) even though 19
  is not a Hadamard order. Sizes with no such split (odd n > 1, n = 2 mod 4, or e.g. 172 = 4 * 43, which needs a
  Williamson-type matrix that is not built here) raise ``InputError``; use ``random_orthogonal`` for those
  (``has_hadamard`` tells which).
- Seeds are explicit: ``random_hadamard``/``random_orthogonal`` draw from a private ``torch.Generator``, so the
  same (n, seed) always gives the same matrix (needed to re-create an online Hadamard after loading a model).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from llm_compress.errors import InputError


# ------------------------------------------------------------------ constructions

def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    f = 3
    while f * f <= q:
        if q % f == 0:
            return False
        f += 2
    return True


def _paley_kind(m: int) -> str | None:
    """Which construction gives a Hadamard matrix of order m: 'sylvester' (m = 1, 2), 'paley1', 'paley2' or None."""
    if m in (1, 2):
        return "sylvester"
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "paley1"
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def _split(n: int) -> tuple[int, int, str] | None:
    """n = 2^a * m with m buildable; prefers the largest power of two (smallest Paley core)."""
    if n < 1:
        return None
    a = (n & -n).bit_length() - 1  # the power of 2 in n
    for k in range(a, -1, -1):
        m = n >> k
        kind = _paley_kind(m)
        if kind is not None:
            return k, m, kind
    return None


def has_hadamard(n: int) -> bool:
    """Whether ``hadamard_matrix(n)`` can build a Hadamard matrix of order n."""
    return _split(n) is not None


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) with chi the Legendre symbol mod the prime q; [q, q] of 0/+1/-1 (int64)."""
    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[0] = 0
    chi[torch.tensor(sorted({(x * x) % q for x in range(1, q)}), dtype=torch.int64)] = 1  # quadratic residues
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley1(m: int) -> torch.Tensor:
    """Unnormalised +-1 Hadamard of order m = q + 1, q = 3 mod 4 prime: H = I + S with S the skew conference matrix."""
    q = m - 1
    s = torch.zeros(m, m, dtype=torch.int64)  # [m, m]
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)  # antisymmetric because chi(-1) = -1 when q = 3 mod 4
    return torch.eye(m, dtype=torch.int64) + s


def _paley2(m: int) -> torch.Tensor:
    """Unnormalised Hadamard of order m = 2(q + 1), q = 1 mod 4 prime, from the symmetric conference matrix C.

    H = C kron [[1, 1], [1, -1]] + I kron [[1, -1], [-1, -1]];  H H^T = 2(q + 1) I because C = C^T, C C^T = q I.
    """
    q = m // 2 - 1
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)  # [q+1, q+1]
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)  # symmetric because chi(-1) = +1 when q = 1 mod 4
    a = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    b = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)


@lru_cache(maxsize=8)
def _hadamard_int(n: int) -> torch.Tensor:
    """Unnormalised +-1 Hadamard matrix [n, n] (int8), H H^T = n I."""
    sp = _split(n)
    if sp is None:
        raise InputError(
            f"no Hadamard matrix of order {n} can be built here (need n = 2^a * m with m = 1, 2, or a Paley order: "
            f"m - 1 prime = 3 mod 4, or m / 2 - 1 prime = 1 mod 4); use random_orthogonal({n}, seed) instead")
    k, m, kind = sp
    core = {"sylvester": lambda: torch.ones(1, 1, dtype=torch.int64) if m == 1 else torch.tensor([[1, 1], [1, -1]]),
            "paley1": lambda: _paley1(m), "paley2": lambda: _paley2(m)}[kind]()
    h = core
    sylvester2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    for _ in range(k):  # Sylvester doubling: H_2n = [[H, H], [H, -H]]
        h = torch.kron(sylvester2, h)
    return h.to(torch.int8)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalised Hadamard matrix [n, n] (H H^T = I); raises InputError naming n when none can be built."""
    return _hadamard_int(int(n)).to(dtype) / float(n) ** 0.5


def random_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """hadamard_matrix(n) @ diag(random +-1): orthogonal [n, n], deterministic in (n, seed)."""
    g = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1  # [n]
    return (hadamard_matrix(n) * signs[None, :]).to(dtype)


def random_orthogonal(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Haar-random orthogonal [n, n]: Q from the QR of a Gaussian, with columns sign-fixed so diag(R) > 0."""
    g = torch.Generator().manual_seed(int(seed))
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return (q * d[None, :]).to(dtype)


def random_rotation(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``random_hadamard`` where a Hadamard of order n exists, else ``random_orthogonal``."""
    return random_hadamard(n, seed, dtype) if has_hadamard(n) else random_orthogonal(n, seed, dtype)


# ------------------------------------------------------------------ online module

class OnlineHadamard(nn.Module):
    """Applies a fixed orthogonal matrix on the last dimension: y = x @ H, x [..., n] -> y [..., n].

    A plain matmul (no fast Walsh-Hadamard kernel), so it traces/exports to ONNX as one MatMul. The buffer is
    non-persistent by default: it is not written to a state_dict/safetensors (one shared copy per model in memory;
    re-create it from (n, seed) after loading).
    """

    def __init__(self, matrix: torch.Tensor, persistent: bool = False):
        super().__init__()
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise InputError(f"OnlineHadamard needs a square [n, n] matrix, got shape {tuple(matrix.shape)}")
        self.register_buffer("matrix", matrix, persistent=persistent)

    @property
    def size(self) -> int:
        return self.matrix.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.to(x.dtype)

    def extra_repr(self) -> str:
        return f"n={self.size}"
