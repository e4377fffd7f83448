"""CUDA graphs for low-latency inference.

At batch 1 a BERT forward on a GPU is bound by kernel launches, not by arithmetic: the host
spends longer issuing ~15 launches per layer than the GPU spends running them. A CUDA graph
records the whole forward once and replays it with one launch. Graphs need static shapes
and static memory, so :class:`CUDAGraphRunner` keeps one graph per (batch, length) bucket:
an input is copied into the top-left corner of the smallest bucket that holds it, the rest
is filled with pad ids under a zero attention mask, the graph is replayed, and the outputs
are cut back to the input's batch and length. The buckets and the writing of an input into
a graph's static buffer: :mod:`fastbert.graph_inputs`.

Padding a bucket does not change the real positions: BERT's attention masks keys, so a
masked token is never attended to, and every other op works token by token. A padded graph
runs every position of its bucket and never reads a value back to the host.

Inputs with padding run *packed* instead (``unpad=True``, the default), as the eager model
does: the layers see only the real tokens, rounded up to a token bucket (a multiple of a
sixteenth of the bucket's positions, see :func:`token_bucket`), so a batch of ragged lengths
costs its real tokens, not batch × longest. The graph is captured per (bucket, token
bucket); before each replay the runner writes the packing (the real tokens' positions and
``cu_seqlens``, computed on the host) into the graph's static buffers. Choosing the token
bucket needs the number of real tokens: one read of the mask, a device sync when the mask is
on the GPU (none when it is on the CPU, as a tokenizer returns it, or absent).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, fields
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import reference
from .graph_inputs import (TOKEN_STEPS, StaticInputs, fill_packing, pad_to_bucket, select_bucket,  # noqa: F401 (re-exported)
                           static_packing, token_bucket, token_step)
from .modeling import BertModel, BertSelfAttention, table_rows
from .ops import implementation
from .outputs import ModelOutput, MultipleChoiceModelOutput, NextSentencePredictorOutput, SequenceClassifierOutput
from .padding import Packing, starts_with_padding

# Outputs with one row per sequence (no length dim); every other tensor is per token.
_PER_SEQUENCE_FIELDS = ("pooler_output", "seq_relationship_logits")
_PER_SEQUENCE_LOGITS = (SequenceClassifierOutput, NextSentencePredictorOutput, MultipleChoiceModelOutput)
_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def run_bucket(model: nn.Module, inputs: torch.Tensor) -> ModelOutput:
    """The forward a graph records: the model on the stacked inputs of :func:`pad_to_bucket`
    (a graph's static buffer, see :class:`StaticInputs`)."""
    return model(input_ids=inputs[0], attention_mask=inputs[1], token_type_ids=inputs[2], position_ids=inputs[3],
                 return_dict=True)


def slice_output(out: ModelOutput, batch: int, seqlen: int, bucket_batch: int) -> ModelOutput:
    """A copy of a bucket's output cut back to ``batch`` sequences of ``seqlen`` tokens.

    The leading dim of every output counts sequences (times the choices of a multiple-choice
    model, whose hidden states are flattened); per-token outputs have the length at dim 1,
    attention probabilities at dims 2 and 3. The copies stay valid after the next replay."""
    sequence_logits = isinstance(out, _PER_SEQUENCE_LOGITS)

    def cut(name: str, t: torch.Tensor) -> torch.Tensor:
        t = t[: t.shape[0] // bucket_batch * batch]
        if name == "attentions":
            t = t[:, :, :seqlen, :seqlen]
        elif name not in _PER_SEQUENCE_FIELDS and not (name == "logits" and sequence_logits):
            t = t[:, :seqlen]
        return t.clone()

    values = {}
    for f in fields(out):
        value = getattr(out, f.name)
        if isinstance(value, torch.Tensor):
            value = cut(f.name, value)
        elif isinstance(value, tuple):
            value = tuple(cut(f.name, t) for t in value)
        values[f.name] = value
    return type(out)(**values)


@contextlib.contextmanager
def capture_layout(model: nn.Module, packing: Optional[Packing] = None) -> Iterator[None]:
    """Run every BertModel inside ``model`` on the layout a capture records: packed by the
    static ``packing`` if one is given, else padded with the key-padding mask; warm-up
    under it compiles and tunes the kernels the capture will record."""
    berts = [m for m in model.modules() if isinstance(m, BertModel)]
    saved = [(m.unpad, m.static_packing) for m in berts]
    for m in berts:
        m.unpad, m.static_packing = False, packing
    try:
        yield
    finally:
        for m, (unpad, static) in zip(berts, saved):
            m.unpad, m.static_packing = unpad, static


def place_qkv(model: nn.Module) -> None:
    """Lay every attention's Q, K and V weights side by side (a no-op where they already
    are), so that a graph reads the fused GEMM's weight from the parameters themselves."""
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            m.place_qkv()


def _sizes(name: str, values) -> Tuple[int, ...]:
    try:
        sizes = tuple(values)
    except TypeError:
        raise TypeError(f"CUDAGraphRunner: {name} must be a sequence of positive ints, got {values!r}") from None
    if not sizes or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes):
        raise ValueError(f"CUDAGraphRunner: {name} must be a non-empty sequence of positive ints, got {values!r}")
    return tuple(sorted(set(sizes)))


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    inputs: StaticInputs          # its buffer (4, bucket_batch, ..., bucket_len) int64, read by every replay
    output: ModelOutput           # written by every replay
    packing: Optional[Packing]    # a packed graph's static packing, None for a padded one


class CUDAGraphRunner:
    """Runs a fastbert model (``BertModel`` or a ``BertFor*`` head, in eval mode) through
    CUDA graphs captured per (batch size, sequence length) bucket.

    ``runner(input_ids, attention_mask=None, token_type_ids=None, position_ids=None)``
    returns the model's output type, cut to the input's batch and length (a copy: later
    calls do not overwrite it). The bucket is the smallest in ``batch_sizes`` ×
    ``seq_lens`` that holds the input. With ``unpad`` (default) an input that fills fewer
    than fifteen sixteenths of its bucket runs packed, on its real tokens rounded up to a
    token bucket (see the module's notes; this reads the mask once, a device sync for
    a mask on the GPU, which servers whose batches are full avoid with ``unpad=False``);
    otherwise it runs padded. Each graph is captured on first use, or up
    front by :meth:`capture_all` (padded graphs); all graphs share one memory pool. Inputs
    larger than the largest bucket run the eager model (with a warning) or, with
    ``fallback=False``, raise.

    ``dtype`` casts the model in place (``model.to(dtype)``) before any capture. With
    ``check_inputs`` (default) ids out of range raise a ValueError before the replay; for
    inputs already on the GPU that costs one device sync, so servers that trust their
    tokenizer may turn it off. Inputs on the CPU are copied to the model's device.

    Outputs at real positions equal the eager model's. Padded positions (mask 0) hold zeros
    after a packed graph, as in eager fastbert; after a padded graph they hold values
    computed as Hugging Face computes them. A graph reads the parameters in place (the fused
    QKV weight too, a view of them), so weights written in place take effect at the next
    call; after replacing parameters (new tensors, ``.to()``) or changing the fastbert
    backend, call :meth:`reset`.
    """

    def __init__(self, model: nn.Module, batch_sizes: Sequence[int] = (1, 8, 32),
                 seq_lens: Sequence[int] = (32, 64, 128, 256, 512), dtype: Optional[torch.dtype] = None, *,
                 fallback: bool = True, check_inputs: bool = True, warmup_iters: int = 3, unpad: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"CUDAGraphRunner takes a fastbert model, got {type(model).__name__}")
        bert = model if isinstance(model, BertModel) else next((m for m in model.modules() if isinstance(m, BertModel)), None)
        if bert is None:
            raise TypeError(f"CUDAGraphRunner takes a fastbert model (BertModel or a BertFor* head); "
                            f"{type(model).__name__} contains no fastbert.BertModel")
        self.batch_sizes = _sizes("batch_sizes", batch_sizes)
        self.seq_lens = _sizes("seq_lens", seq_lens)
        limit = bert.config.max_position_embeddings
        if self.seq_lens[-1] > limit:
            raise ValueError(f"CUDAGraphRunner: seq_lens reach {self.seq_lens[-1]} but the model has "
                             f"max_position_embeddings={limit}")
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"CUDAGraphRunner: dtype must be None, torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")
        if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, int) or warmup_iters < 1:
            raise ValueError(f"CUDAGraphRunner: warmup_iters must be a positive int (capture needs warm-up), got {warmup_iters!r}")
        if model.training:
            raise ValueError("CUDAGraphRunner needs the model in eval mode (call model.eval()): "
                             "a captured graph would replay the same dropout masks")
        device = bert.embeddings.word_embeddings.weight.device
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"CUDA graphs need a CUDA device, but the model is on {device}; "
                               "move it first with model.to('cuda')")
        if dtype is not None:
            model.to(dtype)
        self.model, self.device = model, device
        self.fallback, self.check_inputs, self.warmup_iters, self.unpad = fallback, check_inputs, warmup_iters, bool(unpad)
        pad = bert.config.pad_token_id
        self.pad_token_id = 0 if pad is None else int(pad)
        emb = bert.embeddings
        # Upper bounds (exclusive) of the four stacked inputs; the mask is already 0/1.
        self._limits = (table_rows(emb.word_embeddings), 2, table_rows(emb.token_type_embeddings),
                        table_rows(emb.position_embeddings))
        self._pool = torch.cuda.graph_pool_handle()
        place_qkv(model)
        self._graphs: Dict[Tuple[int, Tuple[int, ...], int, int], _Graph] = {}
        self._warned = False

    @property
    def captured(self) -> List[Tuple[int, Tuple[int, ...], int, int]]:
        """The graphs captured so far, as (batch size, inner dims, sequence length, tokens):
        ``tokens`` is the packed token bucket, or every position of the bucket for a padded
        graph."""
        return sorted(self._graphs)

    def reset(self) -> None:
        """Drop every graph (and its memory); the next calls capture afresh."""
        self._graphs.clear()
        self._pool = torch.cuda.graph_pool_handle()
        place_qkv(self.model)

    def capture_all(self, inner_shape: Sequence[int] = ()) -> None:
        """Capture the padded graph of every bucket now, largest first so that smaller graphs
        reuse its memory (packed graphs are captured on first use). ``inner_shape`` is the
        dims between batch and length: (num_choices,) for BertForMultipleChoice, () otherwise."""
        inner = tuple(int(d) for d in inner_shape)
        for b in reversed(self.batch_sizes):
            for s in reversed(self.seq_lens):
                key = (b, inner, s, b * math.prod(inner) * s)
                if key not in self._graphs:
                    self._capture(*key)

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 token_type_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None) -> ModelOutput:
        if self.model.training:
            raise RuntimeError("CUDAGraphRunner: the model was switched to training mode; call model.eval()")
        self._check_shapes(input_ids, attention_mask, token_type_ids, position_ids)
        batch, seqlen = input_ids.shape[0], input_ids.shape[-1]
        bucket = select_bucket(batch, seqlen, self.batch_sizes, self.seq_lens)
        if bucket is None:
            return self._eager(input_ids, attention_mask, token_type_ids, position_ids)
        if self.check_inputs:
            self._check_ranges((input_ids, None, token_type_ids, position_ids))
        inner = tuple(input_ids.shape[1:-1])
        rows = bucket[0] * math.prod(inner)
        real = self._real_tokens(attention_mask, input_ids.shape, rows, bucket[1])
        capacity = rows * bucket[1]
        tokens = capacity if real is None else token_bucket(int(real.sum()), capacity)
        key = (bucket[0], inner, bucket[1], tokens)
        graph = self._graphs.get(key) or self._capture(*key)
        with torch.cuda.device(self.device), torch.no_grad():
            # A packed graph reads the packing, not the mask: its mask plane is left as it is.
            graph.inputs.stage(input_ids, attention_mask, token_type_ids, position_ids, mask=graph.packing is None)
            if graph.packing is not None:
                fill_packing(graph.packing, real)
            graph.graph.replay()
            return slice_output(graph.output, batch, seqlen, bucket[0])

    # ------------------------------------------------------------------ internals

    def _real_tokens(self, attention_mask: Optional[torch.Tensor], shape: Sequence[int], rows: int,
                     bucket_len: int) -> Optional[torch.Tensor]:
        """The real tokens of the bucket of ``rows`` rows of ``bucket_len`` that holds an
        input of ``shape`` (its sequences, choices flattened), as a bool tensor on the host, or
        None where the input should run padded: unpadding is off, the attention kernel cannot
        be captured packed (the eager reference reads cu_seqlens on the host), a row is
        left-padded, or there is no mask and the input nearly fills the bucket (the hot path
        of a fixed-shape server: nothing is built). Reads the mask once where it is (a device
        sync for a mask on the GPU)."""
        dtype = next(self.model.parameters()).dtype
        if not self.unpad or implementation("attention_qkv", self.device, dtype) is reference.attention_qkv:
            return None
        seqlen, real_rows = shape[-1], math.prod(shape[:-1])
        if attention_mask is None and token_bucket(real_rows * seqlen, rows * bucket_len) == rows * bucket_len:
            return None  # no padding of its own and (nearly) filling its bucket: the padded graph, no mask built
        real = torch.zeros(rows, bucket_len, dtype=torch.bool)
        if attention_mask is None:  # only the bucket's padding: known without reading the device
            real[:real_rows, :seqlen] = True
            return real
        mask = attention_mask.reshape(real_rows, seqlen)
        real[:real_rows, :seqlen] = (mask if mask.dtype == torch.bool else mask != 0).cpu()
        if starts_with_padding(real.sum(1).tolist(), real[:, 0].tolist()):
            return None  # left padding runs padded, as in the eager model (the pooler reads position 0)
        return real

    def _check_shapes(self, input_ids, attention_mask, token_type_ids, position_ids) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"CUDAGraphRunner: input_ids must be an int32 or int64 tensor, "
                             f"got {getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        if input_ids.dim() < 2 or 0 in input_ids.shape:
            raise ValueError(f"CUDAGraphRunner: input_ids must be a non-empty (batch, ..., seq_len) tensor, "
                             f"got shape {tuple(input_ids.shape)}")
        for name, t in zip(_INPUTS[1:], (attention_mask, token_type_ids, position_ids)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.is_floating_point() and name != "attention_mask":
                raise ValueError(f"CUDAGraphRunner: {name} must be an integer tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)}")
            try:
                fits = torch.broadcast_shapes(t.shape, input_ids.shape) == input_ids.shape
            except RuntimeError:
                fits = False
            if not fits or (name == "attention_mask" and t.shape != input_ids.shape):
                raise ValueError(f"CUDAGraphRunner: {name} of shape {tuple(t.shape)} does not fit input_ids of shape "
                                 f"{tuple(input_ids.shape)} (only a 2-D key-padding attention_mask is supported)")

    def _check_ranges(self, inputs: Sequence[Optional[torch.Tensor]]) -> None:
        """Raise a ValueError naming the first of the four inputs (None where not checked)
        whose ids fall outside its table: one read of their ranges per device they are on (a
        sync for the GPU)."""
        given = [(name, t, limit) for name, t, limit in zip(_INPUTS, inputs, self._limits) if t is not None]
        bounds = {}
        for device in {t.device for _, t, _ in given}:
            here = [(name, t) for name, t, _ in given if t.device == device]
            values = torch.stack([v.long() for _, t in here for v in t.aminmax()]).tolist()
            bounds.update((name, values[2 * i: 2 * i + 2]) for i, (name, _) in enumerate(here))
        for name, _, limit in given:
            lo, hi = bounds[name]
            if lo < 0 or hi >= limit:
                raise ValueError(f"CUDAGraphRunner: {name} contains {lo if lo < 0 else hi}, outside the valid range [0, {limit})")

    def _eager(self, input_ids, attention_mask, token_type_ids, position_ids) -> ModelOutput:
        shape = (input_ids.shape[0], input_ids.shape[-1])
        message = (f"CUDAGraphRunner: an input of batch {shape[0]} and length {shape[1]} exceeds the largest bucket "
                   f"(batch {self.batch_sizes[-1]}, length {self.seq_lens[-1]})")
        if not self.fallback:
            raise ValueError(message + "; add a larger bucket or pass fallback=True to run it eagerly")
        if not self._warned:
            warnings.warn(message + "; running the eager model for such inputs", stacklevel=3)
            self._warned = True
        moved = [None if t is None else t.to(self.device) for t in (input_ids, attention_mask, token_type_ids, position_ids)]
        with torch.no_grad():
            return self.model(**dict(zip(_INPUTS, moved)), return_dict=True)

    def _capture(self, bucket_batch: int, inner: Tuple[int, ...], bucket_len: int, tokens: int) -> _Graph:
        staged = StaticInputs((bucket_batch, *inner, bucket_len), self.pad_token_id, self.device)
        inputs = staged.buffer  # pad ids, mask 1, token type 0, positions counted over the bucket
        packing = None
        if tokens < inputs[1].numel():  # packed: warm up on the first `tokens` positions as real tokens
            rows = inputs[1].numel() // bucket_len
            packing = static_packing(rows, bucket_len, tokens, self.device)
            fill_packing(packing, torch.arange(rows * bucket_len) < tokens)
        with torch.cuda.device(self.device), torch.no_grad(), capture_layout(self.model, packing):
            # Warm-up on a side stream (as PyTorch asks) compiles and tunes every kernel and
            # fills the model's caches, so the capture itself only records launches.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup_iters):
                    run_bucket(self.model, inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                output = run_bucket(self.model, inputs)
        entry = _Graph(graph, staged, output, packing)
        self._graphs[(bucket_batch, inner, bucket_len, tokens)] = entry
        return entry

    def __repr__(self) -> str:
        return (f"CUDAGraphRunner({type(self.model).__name__}, batch_sizes={self.batch_sizes}, "
                f"seq_lens={self.seq_lens}, captured={len(self._graphs)})")

