"""What the tokenizer returns (a dict of model inputs with Hugging Face's accessors), and the
padding of encoded inputs behind ``BertTokenizer.pad``."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch


class BatchEncoding(dict):
    """A dict of model inputs; ``enc.input_ids`` works too, and ``enc.to(device)`` moves tensors.
    :meth:`word_ids` and :meth:`sequence_ids` map each token of a row back to its word and its
    segment, as Hugging Face's fast tokenizers do (to align labels, or to find the context of
    a question-answering window)."""

    def __init__(self, data=(), encodings: Optional[Sequence] = None, pad_left: bool = False):
        super().__init__(data)
        # tokenizers' Encoding of each row, read only when a map is asked for: building the maps
        # of every call would cost tokenization time for what few callers use.
        self._encodings = encodings
        self._pad_left = pad_left  # padding went before the tokens (padding_side="left")

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> "BatchEncoding":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()}
        return BatchEncoding(moved, self._encodings, self._pad_left)

    def _map(self, batch_index: int, which: str) -> List[Optional[int]]:
        if self._encodings is None:
            raise ValueError("this encoding has no token maps (packed output)")
        ids = self["input_ids"]
        batched = ids.dim() == 2 if isinstance(ids, torch.Tensor) else bool(ids) and isinstance(ids[0], (list, tuple))
        row = ids[batch_index] if batched else ids
        values = list(getattr(self._encodings[batch_index], which))
        pads = [None] * (len(row) - len(values))  # padding tokens map to nothing
        return pads + values if self._pad_left else values + pads

    def word_ids(self, batch_index: int = 0) -> List[Optional[int]]:
        """The word each token of row ``batch_index`` came from (None for special and padding tokens)."""
        return self._map(batch_index, "word_ids")

    def sequence_ids(self, batch_index: int = 0) -> List[Optional[int]]:
        """0 for tokens of the first text, 1 for the pair's, None for special and padding tokens."""
        return self._map(batch_index, "sequence_ids")


# What each key is padded with; input_ids take the tokenizer's [PAD] id.
PAD_VALUES = {"token_type_ids": 0, "attention_mask": 0, "special_tokens_mask": 1}


def tensor(values, kind: str, dtype: Optional[torch.dtype] = None):
    """``values`` (nested lists, or a tensor) as a torch tensor (``kind`` "pt") or a NumPy
    array ("np"); ``dtype`` None infers it (int64 for ids, float for float labels)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return t.numpy() if kind == "np" else t


def pad_rows(data: Dict[str, list], values: Dict[str, object], side: str, target: int) -> None:
    """Pad, in place, each row of the keys of ``values`` in ``data`` to ``target`` entries
    with that key's value, on ``side`` ("right" or "left")."""
    for key, value in values.items():
        if key in data:
            fill = [[value] * (target - len(x)) for x in data[key]]
            data[key] = ([list(x) + f for x, f in zip(data[key], fill)] if side == "right"
                         else [f + list(x) for x, f in zip(data[key], fill)])


def pad_encoded(encoded_inputs, values: Dict[str, int], side: str, mode: Optional[str], max_length: Optional[int],
                pad_to_multiple_of: Optional[int], return_attention_mask: Optional[bool],
                return_tensors: Optional[str]) -> BatchEncoding:
    """``encoded_inputs`` (a list of per-example dicts, a dict of lists, or one example) with
    the keys of ``values`` padded on ``side`` to the longest row (``mode`` "longest") or to
    ``max_length`` ("max_length"), or not at all (None); an attention mask is made when
    missing unless ``return_attention_mask`` is False. Other keys pass through."""
    if isinstance(encoded_inputs, (list, tuple)):
        if not encoded_inputs or not all(isinstance(f, dict) for f in encoded_inputs):
            raise TypeError("pad takes a dict of lists or a non-empty list of dicts")
        encoded_inputs = {k: [f[k] for f in encoded_inputs] for k in encoded_inputs[0]}
    if not isinstance(encoded_inputs, dict) or "input_ids" not in encoded_inputs:
        raise TypeError("pad needs the encoded inputs' input_ids")

    def as_list(v):
        return v.tolist() if isinstance(v, torch.Tensor) else v

    data = {k: [as_list(x) for x in v] if isinstance(v, (list, tuple)) else as_list(v)
            for k, v in encoded_inputs.items()}
    single = bool(data["input_ids"]) and not isinstance(data["input_ids"][0], (list, tuple))
    if single:
        data = {k: [v] for k, v in data.items()}
    if return_attention_mask is not False and "attention_mask" not in data:
        data["attention_mask"] = [[1] * len(x) for x in data["input_ids"]]
    if mode is not None:
        longest = max(len(x) for x in data["input_ids"])
        target = max_length if mode == "max_length" and max_length is not None else longest
        if pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        pad_rows(data, values, side, target)
    if return_attention_mask is False:
        data.pop("attention_mask", None)
    if return_tensors is not None:
        data = {k: tensor(v, return_tensors) for k, v in data.items()}
    elif single:
        data = {k: v[0] for k, v in data.items()}
    return BatchEncoding(data)
