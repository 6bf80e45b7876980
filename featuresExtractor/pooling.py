"""Pure tensor functions: pooling, L2 normalisation and concatenation of tap outputs.

Each works on torch tensors or numpy arrays row-wise and has no state.

Example:
    >>> import torch
    >>> v = global_avg_pool(torch.ones(2, 3, 4, 4))
    >>> v.shape, l2_normalize(v).norm(dim=1)
    (torch.Size([2, 3]), tensor([1., 1.]))
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

__all__ = ["global_avg_pool", "l2_normalize", "concat_parts", "NORMALIZE_MODES"]

#: Which parts `concat_parts` L2-normalises: none, every part but the embedding, or all.
NORMALIZE_MODES = ("none", "layers", "all")


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """Average a tap output to one vector per image, in float32.

    (N, C, H, W) conv maps are averaged over H and W; (N, L, D) token sequences over
    L; (N, D) vectors pass through.
    """
    # Accumulate in fp32 without first copying a bf16/fp16 map to fp32.
    if x.ndim == 4:
        return x.mean(dim=(2, 3), dtype=torch.float32)
    if x.ndim == 3:
        return x.mean(dim=1, dtype=torch.float32)
    if x.ndim == 2:
        return x.float()
    raise ValueError(f"cannot pool a tap output of shape {tuple(x.shape)}")


def l2_normalize(x, eps: float = 1e-12):
    """Divide each row by its L2 norm (rows of zeros stay zero). Works on numpy or torch."""
    if isinstance(x, torch.Tensor):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def concat_parts(parts: Mapping[str, np.ndarray], normalize: str = "all",
                 embedding: str | None = None) -> np.ndarray:
    """Concatenate pooled parts along the last axis, in mapping order (numpy arrays, or torch tensors).

    `normalize` is "all" (every part L2-normalised), "layers" (all but the
    `embedding` part, which stays raw, as the published 39.39% run did) or "none".
    """
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, not {normalize!r}")
    # Torch tensors stay tensors: the ONNX export (retrieval.export) traces this same function.
    tensors = all(isinstance(p, torch.Tensor) for p in parts.values())
    out: list = []
    for name, part in parts.items():
        keep_raw = normalize == "none" or (normalize == "layers" and name == embedding)
        part = part.float() if tensors else np.asarray(part, dtype=np.float32)
        out.append(part if keep_raw else l2_normalize(part))
    return torch.cat(out, dim=-1) if tensors else np.concatenate(out, axis=-1)


def part_slices(dims: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """Where each part sits in the concatenation: name -> (start, stop)."""
    out, start = {}, 0
    for name, d in dims.items():
        out[name] = (start, start + int(d))
        start += int(d)
    return out
