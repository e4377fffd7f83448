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
from typing import List, Optional, Tuple

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
    position 0, which Hugging Face computes there, so such batches run padded.

    The mask is read from the device once; the packing is computed on the host and sent
    back with two copies, so a packed forward costs one comparison on the device."""
    batch, seqlen = attention_mask.shape
    real = (attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0).cpu()
    positions, cu_seqlens, lengths = host_packing(real)
    if positions.numel() == batch * seqlen:
        return None
    indices, cu_seqlens = (to_device(t, attention_mask.device) for t in (positions, cu_seqlens))
    longest = max(lengths, default=0)
    mark_cu_seqlens_checked(cu_seqlens, longest)  # built here from the mask: valid by construction
    return Packing(indices, cu_seqlens, longest, batch, seqlen,
                   leading_pad=starts_with_padding(lengths, real[:, 0].tolist()))


def host_packing(real: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """The packing of ``real``, a (B, S) bool tensor on the host that is True at the real
    tokens: their positions in the flattened batch (int64, in order), ``cu_seqlens`` (int32,
    B+1) and each row's length, all on the host."""
    lengths = real.sum(1, dtype=torch.int32)
    cu_seqlens = torch.zeros(real.shape[0] + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu_seqlens[1:])
    return real.reshape(-1).nonzero().flatten(), cu_seqlens, lengths.tolist()


def to_device(t: torch.Tensor, device: torch.device, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A host tensor made here, sent to ``device`` (into ``out`` if given) without waiting for
    the GPU: through pinned memory, whose block PyTorch keeps until the copy has run."""
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True) if out is None else out.copy_(t, non_blocking=True)


def starts_with_padding(lengths, first) -> bool:
    """Whether a row with real tokens (``lengths``) has a padded first position (``first``
    is each row's first mask entry): left padding, whose position 0 the pooler reads."""
    return any(n > 0 and not f for n, f in zip(lengths, first))


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
