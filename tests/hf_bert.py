"""Helpers for the model tests: tiny BERT configs, twin models (a transformers model and the
fastbert one holding the same weights), padded inputs, and a max-abs-difference check that
keeps the largest difference seen for each quantity (for reports)."""

from __future__ import annotations

import json
import os
from collections import defaultdict

import torch

import fastbert

transformers = __import__("pytest").importorskip("transformers")

SEQ = 11
COMMON = dict(vocab_size=97, max_position_embeddings=24)
# Three shapes: TinyBERT-like odd widths, a ReLU model, an odd intermediate size and head dim 26.
CONFIGS = {
    "h96-6h-3l-gelu_new": dict(hidden_size=96, num_attention_heads=6, num_hidden_layers=3, intermediate_size=64,
                               hidden_act="gelu_new"),
    "h32-4h-2l-relu": dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=48,
                           hidden_act="relu", type_vocab_size=3),
    "h52-2h-2l-gelu-i37": dict(hidden_size=52, num_attention_heads=2, num_hidden_layers=2, intermediate_size=37,
                               hidden_act="gelu", layer_norm_eps=1e-7),
}
# Lengths of four sequences of SEQ slots.
PADDINGS = {"none": [SEQ] * 4, "mixed": [SEQ, 7, 3, 9], "len1": [1, SEQ, 1, 5], "fully_padded": [SEQ, 0, 6, 4]}
ATOL = 1e-5

MAX_DIFF = defaultdict(float)  # quantity -> largest max-abs difference seen


def config_kwargs(name: str, **extra) -> dict:
    return {**COMMON, **CONFIGS[name], **extra}


def twins(class_name: str, dropout: float = 0.0, seed: int = 0, add_pooling_layer=None, **config):
    """(transformers model, fastbert model) with the same random weights; the HF model
    uses eager attention so that it can return attention probabilities."""
    torch.manual_seed(seed)
    kw = dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **config)
    pool = {} if add_pooling_layer is None else {"add_pooling_layer": add_pooling_layer}
    hf = getattr(transformers, class_name)(transformers.BertConfig(**kw, attn_implementation="eager"), **pool)
    with torch.no_grad():  # move every weight off its init (zero biases, unit LayerNorm) to catch swaps
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fb = getattr(fastbert, class_name)(fastbert.BertConfig(**kw), **pool)
    fb.load_state_dict(hf.state_dict(), strict=True)
    return hf, fb


def inputs(lengths, vocab=97, types=2, seq=SEQ, seed=1):
    """input_ids (pads are 0, real ids never 0), token_type_ids and the 2-D mask."""
    g = torch.Generator().manual_seed(seed)
    rows = len(lengths)
    mask = (torch.arange(seq)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, vocab, (rows, seq), generator=g) * mask
    tt = torch.randint(0, types, (rows, seq), generator=g) * mask
    return ids, tt, mask


def check(name: str, ours: torch.Tensor, theirs: torch.Tensor, atol: float = ATOL) -> float:
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    diff = (ours.detach().double() - theirs.detach().double()).abs().max().item() if ours.numel() else 0.0
    key = name.split("[")[0]
    MAX_DIFF[key] = max(MAX_DIFF[key], diff)
    assert diff <= atol, f"{name}: max abs difference {diff:.3g} > {atol}"
    return diff


def dump_report():
    """With FASTBERT_PARITY_REPORT=path, write the largest differences seen as JSON."""
    path = os.environ.get("FASTBERT_PARITY_REPORT")
    if path and MAX_DIFF:
        old = json.load(open(path)) if os.path.exists(path) else {}
        for k, v in MAX_DIFF.items():
            old[k] = max(old.get(k, 0.0), v)
        with open(path, "w") as f:
            json.dump(old, f, indent=1, sort_keys=True)
