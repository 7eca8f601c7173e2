"""Low-rank arithmetic shared by the LoRA tools: deltas, SVD (dense or of a factored product), rank choice.

A LoRA module stores ``down`` (r x in [x k x k]) and ``up`` (out x r [x 1 x 1]); its weight change is
``scale * up @ down`` with the conv kernel flattened into the input axis (a kxk conv followed by a
1x1 conv is one kxk conv whose weight is exactly that product, reshaped).

Resizing or SVD-merging LoRAs never needs the full (out x in) matrix: the delta is a product of thin
factors ``A @ B`` and its exact SVD follows from two thin QR decompositions and the SVD of an
R x R core (R = total rank). That keeps full-size SDXL resizes at a few seconds on a CPU. Extraction
works on a dense difference; large matrices use a randomized SVD (see :func:`svd_dense`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_SV = 1e-6  # kohya: a module whose largest singular value is below this is a zero matrix (rank 1 kept)
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
# Above this size (smallest side) a randomized SVD replaces the exact one when the rank wanted is small.
_DENSE_SVD_MAX = 1024
_QUANTILE_MAX = 16_000_000  # torch.quantile refuses larger inputs


def as_matrices(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` in float32 with ``A @ B`` the flattened delta: A (out, r), B (r, in * k * k)."""
    return up.reshape(up.shape[0], -1).float(), down.reshape(down.shape[0], -1).float()


def delta_weight(up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * up @ down`` shaped like the base weight: (out, in) or (out, in, k, k), float32."""
    a, b = as_matrices(up.to(down.device), down)
    w = (a @ b) * scale
    if down.dim() == 4:
        w = w.reshape(up.shape[0], *down.shape[1:])
    return w


def svd_of_product(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of ``a @ b`` without forming it.

    Args:
        a: (out, R). b: (R, in).

    Returns:
        ``(U (out, q), S (q,), Vh (q, in))`` with q = min(out, R, in), singular values descending.
    """
    qa, ra = torch.linalg.qr(a)  # (out, m), (m, R) with m = min(out, R)
    qb, rb = torch.linalg.qr(b.T)  # (in, n), (n, R)
    u, s, vh = torch.linalg.svd(ra @ rb.T, full_matrices=False)  # core (m, n)
    return qa @ u, s, vh @ qb.T


def svd_dense(mat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a dense (out, in) matrix, good for its top ``rank`` components.

    Small matrices (or large ranks) get the exact ``torch.linalg.svd``. Large ones get
    ``torch.svd_lowrank`` with oversampling and 4 power iterations: the top ``rank`` singular
    vectors come out within float precision of the exact ones for the decaying spectra of weight
    differences, at a fraction of the cost (an exact SVD of SDXL's 10240 x 1280 feed-forward weight
    takes seconds; the whole UNet about half an hour on one CPU core).
    """
    small = min(mat.shape)
    if small <= _DENSE_SVD_MAX or 4 * rank >= small:
        return torch.linalg.svd(mat, full_matrices=False)
    q = min(small, rank + max(10, rank))
    u, s, v = torch.svd_lowrank(mat, q=q, niter=4)
    return u, s, v.T


def pick_rank(s: torch.Tensor, max_rank: int, method: str | None = None, param: float | None = None) -> int:
    """kohya's rank choice: ``max_rank``, or a dynamic rule capped at ``max_rank``; at least 1.

    Args:
        s: singular values, descending.
        method: ``sv_ratio`` (keep values above s[0] / param), ``sv_fro`` (keep the fraction ``param``
            of the Frobenius norm), ``sv_cumulative`` (keep the fraction ``param`` of the sum of values).
    """
    n = len(s)
    if n == 0 or float(s[0]) <= MIN_SV:
        return 1
    if method == "sv_ratio":
        rank = int(torch.sum(s > s[0] / param).item())
    elif method == "sv_fro":
        sq = s.pow(2)
        rank = int(torch.searchsorted(torch.cumsum(sq, 0) / sq.sum(), torch.tensor(param**2, dtype=s.dtype))) + 1
    elif method == "sv_cumulative":
        rank = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(param, dtype=s.dtype))) + 1
    elif method is None:
        rank = max_rank
    else:
        raise ValueError(f"unknown dynamic method {method!r}")
    return max(1, min(rank, n, max_rank))


@dataclass
class Retained:
    """How much of a matrix a rank-``rank`` truncation keeps (kohya's ``--verbose`` numbers)."""

    rank: int
    sum_retained: float  # sum of kept singular values / sum of all
    fro_retained: float  # Frobenius norm kept / total (sqrt of sum of squares)
    max_ratio: float  # s[0] / s[rank - 1]


def retained(s: torch.Tensor, rank: int) -> Retained:
    total, total_sq = float(s.abs().sum()), float(s.pow(2).sum())
    kept, kept_sq = float(s[:rank].abs().sum()), float(s[:rank].pow(2).sum())
    last = float(s[rank - 1]) if rank <= len(s) else 0.0
    return Retained(
        rank,
        kept / total if total > 0 else float("nan"),
        (kept_sq / total_sq) ** 0.5 if total_sq > 0 else float("nan"),
        float(s[0]) / last if last > 0 else float("inf"),
    )


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile`` (linear interpolation) without its input-size limit."""
    x = x.flatten().float()
    if x.numel() <= _QUANTILE_MAX:
        return torch.quantile(x, q)
    pos = q * (x.numel() - 1)
    lo = int(pos)
    low = torch.kthvalue(x, lo + 1).values
    if lo + 1 >= x.numel():
        return low
    return low + (torch.kthvalue(x, lo + 2).values - low) * (pos - lo)


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, clamp_q: float | None = None,
             pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors ``(A = U S, B = Vh)`` of an SVD, optionally clamped and zero-padded.

    Args:
        clamp_q: kohya's ``--clamp_quantile``: clamp both factors to +-the q-quantile of their values.
        pad_to: append zero components up to this rank (the product is unchanged).

    Returns:
        A (out, rank'), B (rank', in) with rank' = max(rank, pad_to).
    """
    rank = min(rank, len(s))
    a = u[:, :rank] * s[:rank].unsqueeze(0)
    b = vh[:rank, :]
    if clamp_q is not None:
        hi = quantile(torch.cat([a.flatten(), b.flatten()]), clamp_q)
        a, b = a.clamp(-hi, hi), b.clamp(-hi, hi)
    if pad_to is not None and pad_to > rank:
        a = torch.cat([a, a.new_zeros(a.shape[0], pad_to - rank)], dim=1)
        b = torch.cat([b, b.new_zeros(pad_to - rank, b.shape[1])], dim=0)
    return a, b


def to_lora_shapes(a: torch.Tensor, b: torch.Tensor, weight_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` in kohya's shapes for a base weight of ``weight_shape``.

    Linear: up (out, r), down (r, in). Conv (out, in, k, k): up (out, r, 1, 1), down (r, in, k, k).
    """
    rank = a.shape[1]
    if len(weight_shape) == 4:
        return a.reshape(weight_shape[0], rank, 1, 1).contiguous(), b.reshape(rank, *weight_shape[1:]).contiguous()
    return a.contiguous(), b.contiguous()
