"""Unpadding: the encoder runs on the real tokens of a batch, packed one after another.

:func:`unpad_mask` turns a 2-D attention mask into the indices of the real tokens and
``cu_seqlens``; :func:`pad` scatters packed rows back into a zero-filled padded tensor.

A CUDA graph needs the packed token count fixed when it is captured, so
``fastbert.cuda_graphs`` packs into a bucket of tokens that may hold more than the real
ones: the extra tokens come after the last sequence, belong to none (attention neither reads
nor writes them), and are gathered from and scattered to ``spare`` rows past the B*S padded
positions, so they never touch a real or a padded position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .functional import mark_cu_seqlens_checked


@dataclass
class Packing:
    indices: torch.Tensor     # (T,) int64: positions of the real tokens in the flattened (B*S) batch
    cu_seqlens: torch.Tensor  # (B+1,) int32: where each sequence starts in the packed tokens
    max_seqlen: int           # the longest sequence
    batch: int
    seqlen: int
    spare: int = 0            # rows after the B*S positions that tokens past cu_seqlens[-1] map to
    leading_pad: bool = False  # some row has real tokens but a padded first position (left padding)

    @property
    def total(self) -> int:
        return self.indices.numel()


def unpad_mask(attention_mask: torch.Tensor) -> Optional[Packing]:
    """The packing of a (B, S) mask with nonzero entries at real tokens (in any order), or
    None when every token is real (nothing to gather or scatter). ``leading_pad`` tells
    whether a row with real tokens starts with padding (left padding): the pooler reads
    position 0, which Hugging Face computes there, so such batches run padded."""
    batch, seqlen = attention_mask.shape
    keep = attention_mask.reshape(-1) != 0
    lengths = keep.view(batch, seqlen).sum(1, dtype=torch.int32)
    # The one read from the device; everything below is sized by it.
    host, first = torch.stack([lengths, keep.view(batch, seqlen)[:, 0].int()]).tolist() if batch else ([], [])
    if sum(host) == batch * seqlen:
        return None
    indices = nonzero(keep, sum(host))
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    longest = max(host, default=0)
    mark_cu_seqlens_checked(cu_seqlens, longest)  # built here from the mask: valid by construction
    return Packing(indices, cu_seqlens, longest, batch, seqlen, leading_pad=starts_with_padding(host, first))


def starts_with_padding(lengths, first) -> bool:
    """Whether a row with real tokens (``lengths``) has a padded first position (``first``
    is each row's first mask entry): left padding, whose position 0 the pooler reads."""
    return any(n > 0 and not f for n, f in zip(lengths, first))


def nonzero(keep: torch.Tensor, total: int) -> torch.Tensor:
    """Indices of the True entries, ``total`` of them, without a second device sync where
    ``nonzero_static`` exists for the device."""
    try:
        return torch.nonzero_static(keep, size=total).flatten()
    except (NotImplementedError, RuntimeError, AttributeError):
        return torch.nonzero(keep).flatten()


def unpad(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """(B, S, ...) -> (T, ...): the rows of the real tokens (zeros for spare ones)."""
    flat = x.reshape(packing.batch * packing.seqlen, *x.shape[2:])
    if packing.spare:
        flat = torch.cat([flat, flat.new_zeros(packing.spare, *flat.shape[1:])])
    return flat[packing.indices]


def pad(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """(T, ...) -> (B, S, ...), zeros at padded positions."""
    rows = packing.batch * packing.seqlen
    out = x.new_zeros(rows + packing.spare, *x.shape[1:])
    out = out.index_copy(0, packing.indices, x)  # differentiable, unlike an in-place scatter
    return out[:rows].view(packing.batch, packing.seqlen, *x.shape[1:])
