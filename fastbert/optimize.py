"""``fastbert.optimize``: run a live Hugging Face model on fastbert's encoder.

Every ``transformers`` ``BertModel`` inside the model (``model.bert`` of any BERT head,
sentence-transformers' ``auto_model``, …) is replaced, in place, by a
:class:`fastbert.BertModel` built from the *same* submodule objects: the same
``nn.Embedding``, ``nn.Linear``, ``nn.LayerNorm`` and ``nn.Dropout`` instances, hence the same
parameters. Nothing is copied; an optimizer, a training loop or a ``state_dict`` that held
the HF parameters keeps working, and the state-dict keys do not change.

The fastbert encoder also shares the HF ``config`` object, so ``config.output_hidden_states``
and the like keep their effect. Outputs at padded positions are zeros (see
:class:`fastbert.BertModel`); real positions, pooled outputs and losses match HF.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from .config import _ACTIVATIONS, BertConfig
from .modeling import BertModel

# fastbert leaves whose HF counterpart (same qualified name) is taken over as it is, whatever
# module it is now (an adapter wrapping the original is called as a module).
_SHARED_TYPES = (nn.Embedding, nn.Linear, nn.LayerNorm, nn.Dropout, nn.Tanh)
_CONFIG_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                  "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id")


def optimize(model: nn.Module) -> nn.Module:
    """Swap each ``transformers`` ``BertModel`` inside ``model`` for a fastbert one that
    shares its parameters, in the same train/eval mode, and return ``model``.

    ``model`` itself may be a ``transformers.BertModel``: it has no parent to be swapped
    in, so a :class:`fastbert.BertModel` sharing its parameters is returned instead and
    **the return value must be used** (``model = fastbert.optimize(model)``).

    A submodule that was replaced (a peft LoRA adapter, a quantized linear, a hooked
    module) is shared as it is, and fastbert calls it as a module rather than fusing it
    (``fastbert.modeling.plain``), so its forward keeps its effect.

    Raises ValueError when no BERT is found or a BERT's config is one fastbert does not
    implement (relative position embeddings, a decoder or cross-attention, another
    activation), and TypeError when a submodule is missing or a dropout was replaced by
    something that is not an ``nn.Dropout`` (fastbert reads its ``p``).
    """
    hf_bert = _hf_bert_class()
    if isinstance(model, BertModel):
        return model
    if isinstance(model, hf_bert):
        return from_transformers(model)
    swapped: Dict[int, BertModel] = {}
    _swap_children(model, hf_bert, swapped)
    if not swapped:
        raise ValueError(f"fastbert.optimize found no transformers BertModel inside {type(model).__name__}")
    return model


def from_transformers(hf_model: nn.Module) -> BertModel:
    """A :class:`fastbert.BertModel` built from a ``transformers`` ``BertModel``'s own
    submodules (shared, not copied), in its train/eval mode."""
    config = hf_model.config
    _check_config(config)
    fb_config = BertConfig(**{k: getattr(config, k) for k in _CONFIG_FIELDS if hasattr(config, k)})
    # Built on the meta device: every tensor is replaced by HF's below, so allocating and
    # initialising fresh weights would be wasted work.
    with torch.device("meta"):
        model = BertModel(fb_config, add_pooling_layer=getattr(hf_model, "pooler", None) is not None)
    for name, module in list(model.named_modules()):
        if not isinstance(module, _SHARED_TYPES):
            continue
        theirs = _get(hf_model, name)
        if isinstance(module, nn.Dropout) and not isinstance(theirs, nn.Dropout):
            raise TypeError(f"fastbert.optimize: {name} is a {type(theirs).__name__}, expected an nn.Dropout "
                            "(fastbert reads its probability p)")
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, theirs)
    for name in ("position_ids", "token_type_ids"):
        buffer = getattr(hf_model.embeddings, name, None)
        if buffer is None or buffer.is_meta:
            n, device = fb_config.max_position_embeddings, hf_model.embeddings.word_embeddings.weight.device
            buffer = (torch.arange(n, device=device)[None] if name == "position_ids"
                      else torch.zeros(1, n, dtype=torch.long, device=device))
        model.embeddings.register_buffer(name, buffer, persistent=False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise TypeError(f"fastbert.optimize: no HF counterpart for {', '.join(left)}")
    model.config = config  # shared: HF's switches (output_hidden_states, return_dict…) keep their effect
    if any(getattr(m, "gradient_checkpointing", False) for m in hf_model.modules()):
        model.activation_checkpointing_enable()
    model.train(hf_model.training)
    return model


def _swap_children(module: nn.Module, hf_bert: type, swapped: Dict[int, BertModel]) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, hf_bert):
            if id(child) not in swapped:  # one BERT reachable twice stays one module
                swapped[id(child)] = from_transformers(child)
            setattr(module, name, swapped[id(child)])
        elif not isinstance(child, BertModel):
            _swap_children(child, hf_bert, swapped)


def _get(root: nn.Module, name: str) -> nn.Module:
    try:
        return root.get_submodule(name)
    except AttributeError:
        raise TypeError(f"fastbert.optimize: the transformers model has no submodule {name}") from None


def _check_config(config) -> None:
    problems = []
    position = getattr(config, "position_embedding_type", "absolute")
    if position not in (None, "absolute"):
        problems.append(f"position_embedding_type={position!r} (fastbert implements absolute positions)")
    if getattr(config, "is_decoder", False):
        problems.append("is_decoder=True (fastbert implements BERT as a bidirectional encoder)")
    if getattr(config, "add_cross_attention", False):
        problems.append("add_cross_attention=True (no cross-attention in fastbert)")
    act = getattr(config, "hidden_act", "gelu")
    if isinstance(act, str) and act not in _ACTIVATIONS:
        problems.append(f"hidden_act={act!r} (fastbert supports {', '.join(_ACTIVATIONS)})")
    if problems:
        raise ValueError("fastbert.optimize cannot run this BERT: " + "; ".join(problems))


def _hf_bert_class() -> type:
    try:
        from transformers.models.bert.modeling_bert import BertModel as HFBertModel
    except ImportError as exc:
        raise ImportError(f"fastbert.optimize needs the transformers package: {exc}") from None
    return HFBertModel
