"""The checks of BertModel.forward's arguments: every bad input gets a ValueError that names
it (wrong dtype, shape or device, a sequence longer than the position table), and Hugging
Face keywords that fastbert does not implement are refused rather than ignored."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

# Keyword arguments Hugging Face's BertModel.forward accepts that change nothing for an encoder
# run without a cache; HF heads pass some of them through.
_IGNORED_KWARGS = ("use_cache", "num_items_in_batch", "output_router_logits")
# Features fastbert does not implement (decoder, cache, head masking, caller-packed sequences):
# refused unless None, rather than silently ignored.
_UNSUPPORTED_KWARGS = ("encoder_hidden_states", "encoder_attention_mask", "past_key_values", "cache", "head_mask",
                       "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", "is_causal")


def check_forward_kwargs(kwargs) -> None:
    """Refuse BertModel.forward keywords that fastbert does not implement; ignore the no-ops."""
    for key, value in kwargs.items():
        if value is None or key in _IGNORED_KWARGS or (key == "is_causal" and value is False):
            continue
        if key in _UNSUPPORTED_KWARGS:
            raise ValueError(f"fastbert.BertModel does not support {key} (it implements BERT as an encoder, "
                             "without a cache or head masking)")
        raise TypeError(f"BertModel.forward() got an unexpected keyword argument {key!r}")


def _is_int(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.int32, torch.int64)


def check_model_inputs(config, device: torch.device, input_ids, inputs_embeds, attention_mask, token_type_ids,
                       position_ids) -> Tuple[int, int]:
    """Check BertModel.forward's inputs against the model's config and device: raise a
    ValueError naming the problem; return (batch, seq_len)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds"
                         + (" (both were given)" if input_ids is not None else " (neither was given)"))
    if input_ids is not None:
        if not _is_int(input_ids):
            raise ValueError(f"input_ids must be an int32 or int64 tensor, got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        shape, given = tuple(input_ids.shape), input_ids
    else:
        if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
            raise ValueError(f"inputs_embeds must be a floating-point tensor, got "
                             f"{getattr(inputs_embeds, 'dtype', type(inputs_embeds).__name__)}")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(f"inputs_embeds must be (batch, seq_len, {config.hidden_size}), "
                             f"got {tuple(inputs_embeds.shape)}")
        shape, given = tuple(inputs_embeds.shape[:2]), inputs_embeds
    if given.device != device:
        raise ValueError(f"the inputs are on {given.device} but the model is on {device}")
    if shape[1] == 0:
        raise ValueError(f"the input has no tokens (shape {shape}): a sequence needs at least one")
    if position_ids is None and shape[1] > config.max_position_embeddings:
        raise ValueError(f"sequence length {shape[1]} is longer than max_position_embeddings "
                         f"({config.max_position_embeddings}); truncate the input")
    for name, t in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
        if t is None:
            continue
        if not _is_int(t):
            raise ValueError(f"{name} must be an int32 or int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        # Dimension by dimension: comparing a Size with a tuple would make torch.export guard on batch != seq_len.
        if not ((t.dim() == 1 and t.shape[0] == shape[1])
                or (t.dim() == 2 and t.shape[1] == shape[1] and t.shape[0] in (1, shape[0]))):
            raise ValueError(f"{name} must be (batch, seq_len) = {shape}, (1, seq_len) or (seq_len,), "
                             f"got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the model is on {device}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise ValueError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
        if attention_mask.is_complex():
            raise ValueError(f"attention_mask must be bool, integer or floating point, got {attention_mask.dtype}")
        if attention_mask.device != device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but the model is on {device}")
        m, (b, s) = tuple(attention_mask.shape), shape
        fits = {2: m == (b, s), 3: m == (b, s, s),
                4: len(m) == 4 and m[0] in (1, b) and m[1] in (1, config.num_attention_heads)
                and m[2] in (1, s) and m[3] == s}.get(len(m), False)
        if not fits:
            raise ValueError(f"attention_mask of shape {m} does not fit input of shape {shape}: use (batch, seq_len), "
                             "(batch, seq_len, seq_len) or (batch, 1|heads, 1|seq_len, seq_len)")
    return shape


def embeds_in(inputs_embeds: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``inputs_embeds`` in the model's dtype when that holds them exactly (bf16 embeddings
    into an fp32 model: what HF's sum with the position embeddings promotes them to); a
    narrowing cast is the caller's to make."""
    if inputs_embeds is None or inputs_embeds.dtype == dtype:
        return inputs_embeds
    if torch.promote_types(inputs_embeds.dtype, dtype) != dtype:
        raise ValueError(f"inputs_embeds are {inputs_embeds.dtype} but the model is {dtype}: cast them "
                         f"(inputs_embeds.to({dtype})) or the model")
    return inputs_embeds.to(dtype)


def full_ids(embeddings, input_ids, token_type_ids, position_ids, batch: int, seqlen: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(position_ids, token_type_ids), each (batch, seq_len) in the index dtype of input_ids
    (the kernels read the three alike). The defaults are views of the embeddings' constant
    buffers, nothing allocated or filled; token types past the buffer's length (a sequence
    longer than max_position_embeddings, with its own position ids) are zeros."""
    index_dtype = input_ids.dtype if input_ids is not None else torch.long
    if position_ids is None:
        position_ids = embeddings.position_ids[:, :seqlen]
    if token_type_ids is None:
        buffered = embeddings.token_type_ids
        token_type_ids = buffered[:, :seqlen] if seqlen <= buffered.shape[1] else buffered.new_zeros(1, seqlen)
    return tuple(t.to(index_dtype).reshape(-1, seqlen).expand(batch, seqlen) for t in (position_ids, token_type_ids))
