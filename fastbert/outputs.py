"""Model outputs: dataclasses that also index like tuples and dicts, as Hugging Face's do.

``out.last_hidden_state``, ``out["last_hidden_state"]`` and ``out[0]`` all work; integer
and slice indexing skip the fields that are None, exactly as in ``transformers``, and
``out[key] = value`` sets a field or adds a key after them, as on HF's outputs. Each class
is a pytree node (its set fields), so ``torch.export`` takes models that return them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any, List, Optional, Tuple

import torch
import torch.utils._pytree as pytree


class ModelOutput:
    def __init_subclass__(cls, **kwargs):
        # A pytree node, as Hugging Face registers its outputs: torch.export and the pytree
        # utilities see through it to its tensors.
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(cls, _flatten, functools.partial(_unflatten, cls),
                                    serialized_type_name=f"{cls.__module__}.{cls.__name__}")

    def to_tuple(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, k) for k in self.keys())

    def keys(self):
        named = [f.name for f in fields(self) if getattr(self, f.name) is not None]
        return named + [k for k in self.__dict__.get("_extra_keys", ()) if getattr(self, k) is not None]

    def __setitem__(self, key: str, value) -> None:
        """``out[key] = value`` sets a field or, as on Hugging Face's outputs (dicts), adds a key
        after the fields (pipelines add ``input_ids`` to a model's output this way)."""
        if not isinstance(key, str):
            raise TypeError(f"{type(self).__name__} keys are strings, got {key!r}")
        if key not in {f.name for f in fields(self)}:
            extra = self.__dict__.setdefault("_extra_keys", [])
            if key not in extra:
                extra.append(key)
        setattr(self, key, value)

    def values(self):
        return [getattr(self, k) for k in self.keys()]

    def items(self):
        return [(k, getattr(self, k)) for k in self.keys()]

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


def _flatten(out: ModelOutput) -> Tuple[List[Any], List[str]]:
    keys = out.keys()
    return [getattr(out, k) for k in keys], keys


def _unflatten(cls, values, keys) -> ModelOutput:
    named = {f.name for f in fields(cls)}
    out = cls(**{k: v for k, v in zip(keys, values) if k in named})
    for k, v in zip(keys, values):
        if k not in named:
            out[k] = v
    return out


def wants_dict(config, return_dict: Optional[bool]) -> bool:
    """Hugging Face's rule: ``return_dict`` if given, else the config's (``use_return_dict``).
    One difference: while ``torch.jit`` traces (``torch.jit.trace``, and ``torch.onnx.export``
    with ``dynamo=False``), outputs left to the config are tuples. The tracer takes tuples and
    dicts; Hugging Face's outputs are dicts, these dataclasses are not."""
    if return_dict is None:
        return config.use_return_dict and not torch.jit.is_tracing()
    return bool(return_dict)


T = Optional[torch.Tensor]
Ts = Optional[Tuple[torch.Tensor, ...]]


@dataclass
class BaseModelOutputWithPoolingAndCrossAttentions(ModelOutput):
    """BertModel's output, with transformers 5's fields: an encoder has no ``cache``, and its
    ``cross_attentions`` are an empty tuple when attentions are asked for (as HF returns)."""
    last_hidden_state: T = None
    pooler_output: T = None
    hidden_states: Ts = None
    cache: Any = None
    attentions: Ts = None
    cross_attentions: Ts = None


BaseModelOutputWithPooling = BaseModelOutputWithPoolingAndCrossAttentions  # the earlier name


@dataclass
class BertForPreTrainingOutput(ModelOutput):
    loss: T = None
    prediction_logits: T = None
    seq_relationship_logits: T = None
    hidden_states: Ts = None
    attentions: Ts = None


@dataclass
class MaskedLMOutput(ModelOutput):
    loss: T = None
    logits: T = None
    hidden_states: Ts = None
    attentions: Ts = None


@dataclass
class NextSentencePredictorOutput(MaskedLMOutput):
    pass


@dataclass
class SequenceClassifierOutput(MaskedLMOutput):
    pass


@dataclass
class TokenClassifierOutput(MaskedLMOutput):
    pass


@dataclass
class MultipleChoiceModelOutput(MaskedLMOutput):
    pass


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: T = None
    start_logits: T = None
    end_logits: T = None
    hidden_states: Ts = None
    attentions: Ts = None
