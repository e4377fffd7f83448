"""The inputs of a CUDA graph: choosing a (batch, length) bucket and a token bucket, writing
an input into a bucket's static buffer, and the static packing of a packed graph.

A graph reads its inputs from one static int64 buffer of shape (4, bucket_batch, ...,
bucket_len): input ids, attention mask (0/1), token type ids and position ids. An input
fills the leading corner of each plane; the rest holds pad ids, mask 0, token type 0 and
position 0. :class:`StaticInputs` keeps such a buffer and writes into it only what differs
from what it already holds, so that a call repeating the last call's shape with missing
optional inputs writes the input ids alone.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .padding import Packing, host_packing, to_device

TOKEN_STEPS = 16  # token buckets per (batch, length) bucket

Extent = Tuple[int, ...]
Box = Tuple[slice, ...]


def token_bucket(total: int, capacity: int, steps: int = TOKEN_STEPS) -> int:
    """The token count of the packed graph that runs ``total`` real tokens of a bucket with
    ``capacity`` positions: ``total`` rounded up to a step of ``capacity / steps`` (itself
    rounded up to a multiple of 64, a GEMM tile), at least one step and at most ``capacity``
    (which means: run the padded graph)."""
    step = token_step(capacity, steps)
    return min(capacity, max(step, -(-total // step) * step))


def token_step(capacity: int, steps: int = TOKEN_STEPS) -> int:
    return -(-capacity // (steps * 64)) * 64


def select_bucket(batch: int, seqlen: int, batch_sizes: Sequence[int],
                  seq_lens: Sequence[int]) -> Optional[Tuple[int, int]]:
    """The smallest (batch size, sequence length) bucket that holds a (batch, seqlen) input,
    or None when the input is larger than the largest bucket in either dim. The bucket
    lists must be sorted ascending."""
    b = next((size for size in batch_sizes if size >= batch), None)
    s = next((size for size in seq_lens if size >= seqlen), None)
    return None if b is None or s is None else (b, s)


def pad_to_bucket(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], token_type_ids: Optional[torch.Tensor],
                  position_ids: Optional[torch.Tensor], bucket_batch: int, bucket_len: int, pad_token_id: int) -> torch.Tensor:
    """The four inputs stacked into one int64 tensor of shape (4, bucket_batch, ..., bucket_len),
    on the ids' device: the given values in the leading corner; pad ids, mask 0, token type 0
    and position 0 elsewhere, so rows past the batch are fully masked. The mask becomes
    0/1; missing token types are 0 and missing positions count from 0, as in the model.
    :meth:`StaticInputs.stage` writes the same values into a static buffer."""
    shape = input_ids.shape
    pad = [0, bucket_len - shape[-1]] + [0, 0] * (input_ids.dim() - 2) + [0, bucket_batch - shape[0]]
    if attention_mask is None:
        attention_mask = torch.ones(shape, dtype=torch.long, device=input_ids.device)
    if token_type_ids is None:
        token_type_ids = torch.zeros((), dtype=torch.long, device=input_ids.device)
    if position_ids is None:
        position_ids = torch.arange(shape[-1], device=input_ids.device)
    parts = [torch.nn.functional.pad(input_ids.long(), pad, value=pad_token_id),
             torch.nn.functional.pad(attention_mask.ne(0).long(), pad)]
    parts += [torch.nn.functional.pad(t.to(device=input_ids.device, dtype=torch.long).expand(shape), pad)
              for t in (token_type_ids, position_ids)]
    return torch.stack(parts)


def _box(extent: Extent) -> Box:
    return tuple(slice(0, n) for n in extent)


def _outside(extent: Extent, corner: Extent) -> List[Box]:
    """Disjoint boxes that cover the leading corner ``extent`` minus the leading corner
    ``corner``: at most one per dim, empty ones left out."""
    boxes = []
    for d in range(len(extent)):
        if corner[d] < extent[d]:
            box = (tuple(slice(0, min(c, e)) for c, e in zip(corner[:d], extent[:d])) + (slice(corner[d], extent[d]),)
                   + _box(extent[d + 1:]))
            if all(s.stop > s.start for s in box):
                boxes.append(box)
    return boxes


class StaticInputs:
    """The static input buffer of a graph, ``buffer``: (4, *shape) int64 on ``device``.

    It starts as a capture reads it: pad ids, mask 1, token type 0 and positions counted
    over the whole bucket. :meth:`stage` makes it equal :func:`pad_to_bucket`'s result for
    its arguments. For each plane it records what the plane holds: the given values or the
    implicit value of a missing input (mask 1, token type 0, positions 0..S-1), in a leading
    corner of some extent, and the pad value everywhere else. A plane that already holds an
    implicit value is not written again, and the pad value is written only where the
    plane may hold something else."""

    def __init__(self, shape: Sequence[int], pad_token_id: int, device) -> None:
        self.shape: Extent = tuple(int(n) for n in shape)
        self.pad_values = (int(pad_token_id), 0, 0, 0)
        self.buffer = torch.empty((4, *self.shape), dtype=torch.long, device=device)
        self._positions = torch.arange(self.shape[-1], device=device)
        self.buffer[0].fill_(self.pad_values[0])
        self.buffer[1].fill_(1)
        self.buffer[2].zero_()
        self.buffer[3].copy_(self._positions.expand(self.shape))
        empty = (0,) * len(self.shape)
        # Per plane: (holds an implicit value, extent of the corner outside which it holds the pad value).
        self._held: List[Tuple[bool, Extent]] = [(False, empty), (True, self.shape), (True, empty), (True, self.shape)]

    def forget(self) -> None:
        """Treat every plane as holding unknown values (after a write from elsewhere): the
        next :meth:`stage` writes each plane in full."""
        self._held = [(False, self.shape)] * 4

    def stage(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
              token_type_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
              mask: bool = True) -> None:
        """Write an input into the buffer. ``input_ids`` is (batch, ..., seq_len) within the
        buffer's shape; ``attention_mask`` has its shape (any dtype: nonzero means a real
        token); token types and positions broadcast to it. The inputs may be on another
        device than the buffer. ``mask=False`` leaves the mask plane as it is (for a graph
        that does not read it)."""
        extent = tuple(input_ids.shape)
        for index, value in enumerate((input_ids, attention_mask, token_type_ids, position_ids)):
            if index != 1 or mask:
                self._stage_plane(index, value, extent)

    def _stage_plane(self, index: int, value: Optional[torch.Tensor], extent: Extent) -> None:
        """Make plane ``index`` hold ``value`` (None: its implicit value) in the corner ``extent``
        and the pad value elsewhere."""
        implicit = value is None
        if implicit and index == 2:
            extent = (0,) * len(extent)  # token type 0 is the pad value
        held_implicit, held = self._held[index]
        if implicit and held_implicit and held == extent:
            return
        plane = self.buffer[index]
        stale = _outside(held, extent)
        keep = implicit and held_implicit and len(stale) <= 1  # the corners' overlap already holds the values
        if len(stale) > 1:
            stale = [_box(held)]
        todo = _outside(extent, held) if keep else [_box(extent)]
        if len(todo) > 1:
            todo = [_box(extent)]
        self._held[index] = (False, self.shape)  # unknown until every write below is done
        for box in stale:
            plane[box].fill_(self.pad_values[index])
        for box in todo:
            if all(s.stop > s.start for s in box):
                self._write(index, plane[box], value, box)
        self._held[index] = (implicit, extent)

    def _write(self, index: int, target: torch.Tensor, value: Optional[torch.Tensor], box: Box) -> None:
        if value is None:  # the mask or the positions: a missing token type is the pad value, never written
            if index == 1:
                target.fill_(1)
            else:
                target.copy_(self._positions[box[-1]])
        elif index == 1 and value.dtype != torch.bool:
            if value.device == target.device:
                torch.ne(value, 0, out=target)
            else:
                target.copy_(value.ne(0))
        else:
            target.copy_(value)


def static_packing(rows: int, seqlen: int, tokens: int, device) -> Packing:
    """The static buffers of a packed graph for ``rows`` sequences of up to ``seqlen`` tokens
    run as ``tokens`` packed tokens; filled before each replay by :func:`fill_packing`. The
    tokens past the real ones map to spare rows (one token step of them: a token bucket
    holds fewer than a step more than the real tokens)."""
    spare = token_step(rows * seqlen)
    indices = torch.arange(rows * seqlen, rows * seqlen + tokens, device=device)
    cu_seqlens = torch.zeros(rows + 1, dtype=torch.int32, device=device)
    return Packing(indices, cu_seqlens, seqlen, rows, seqlen, spare=spare)


def fill_packing(packing: Packing, real: torch.Tensor) -> None:
    """Write the packing of ``real``, the bucket's real tokens as a bool tensor on the host
    (``packing.batch`` rows of ``packing.seqlen``, choices flattened), into the static
    buffers: the real tokens' positions, then spare rows for the rest of the token bucket;
    ``cu_seqlens`` of the rows (sequences past the batch are empty). Computed on the host and
    sent with two copies, without reading the device."""
    flat = packing.batch * packing.seqlen
    if real.numel() != flat:
        raise ValueError(f"a mask of {real.numel()} positions does not fit the buffers of {packing.batch} rows "
                         f"of {packing.seqlen}")
    positions, cu_seqlens, _ = host_packing(real.reshape(packing.batch, packing.seqlen))
    total = positions.numel()
    if not total <= packing.total <= total + packing.spare:
        raise ValueError(f"a packing of {total} real tokens does not fit the buffers of {packing.total} tokens "
                         f"({packing.spare} spare)")
    spare = torch.arange(flat, flat + packing.total - total)
    to_device(torch.cat([positions, spare]), packing.indices.device, out=packing.indices)
    to_device(cu_seqlens, packing.cu_seqlens.device, out=packing.cu_seqlens)
