"""BertConfig: Hugging Face's field names and defaults, readable from and writable to
the same config.json."""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, Union

CONFIG_NAME = "config.json"

_DEFAULTS: Dict[str, Any] = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=512,
    type_vocab_size=2,
    initializer_range=0.02,
    layer_norm_eps=1e-12,
    pad_token_id=0,
    position_embedding_type="absolute",
    use_cache=True,
    classifier_dropout=None,
    problem_type=None,
    tie_word_embeddings=True,
    # Generic Hugging Face fields, kept so that config.json round-trips and HF code that
    # reads them (heads, pipelines, sentence-transformers) finds them.
    is_decoder=False,
    add_cross_attention=False,
    is_encoder_decoder=False,
    chunk_size_feed_forward=0,
    output_attentions=False,
    output_hidden_states=False,
    return_dict=True,
    torchscript=False,
    bos_token_id=None,
    eos_token_id=None,
    architectures=None,
    dtype=None,
)

_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_python", "gelu_fast", "relu")


class BertConfig:
    """The configuration of a BERT model (Hugging Face's ``BertConfig`` fields).

    Unknown keys are kept as attributes and written back by :meth:`to_dict`, so a
    config.json survives a round trip. ``num_labels`` is derived from ``id2label`` as in HF.
    """

    model_type = "bert"

    def __init__(self, **kwargs):
        num_labels = kwargs.pop("num_labels", None)
        for key, value in _DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, value))
        id2label = kwargs.pop("id2label", None)
        label2id = kwargs.pop("label2id", None)
        if num_labels is not None and (not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1):
            raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
        if id2label is None:
            id2label = {i: f"LABEL_{i}" for i in range(2 if num_labels is None else num_labels)}
        try:
            self.id2label = {int(k): v for k, v in id2label.items()}
        except (TypeError, ValueError, AttributeError):
            raise ValueError(f"id2label must map class ids (ints, or their strings) to names, got {id2label!r}") from None
        self.label2id = label2id if label2id is not None else {v: k for k, v in self.id2label.items()}
        kwargs.pop("model_type", None)
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the first field that fastbert cannot run."""
        for key in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "type_vocab_size", "num_hidden_layers"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "num_hidden_layers" else 1):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"{key} must be in [0, 1), got {value!r}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        pad = self.pad_token_id
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad < self.vocab_size):
            raise ValueError(f"pad_token_id must be None or an id in [0, vocab_size={self.vocab_size}), got {pad!r}")
        if self.is_decoder or self.add_cross_attention:
            raise ValueError("fastbert implements BERT as an encoder: is_decoder and add_cross_attention must be False")
        if self.problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
            raise ValueError(f"problem_type {self.problem_type!r} is not one of 'regression', "
                             "'single_label_classification', 'multi_label_classification'")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"position_embedding_type {self.position_embedding_type!r} is not supported "
                             "(fastbert implements BERT's absolute position embeddings)")
        if isinstance(self.hidden_act, str) and self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; choose one of {_ACTIVATIONS}")

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_labels must be a positive integer, got {n!r}")
        self.id2label = {i: f"LABEL_{i}" for i in range(n)}
        self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def use_return_dict(self) -> bool:
        """Outputs as dataclasses, unless ``return_dict`` is off or ``torchscript`` asks for tuples (HF's rule)."""
        return bool(self.return_dict) and not getattr(self, "torchscript", False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # -- (de)serialisation -------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any], **overrides) -> "BertConfig":
        return cls(**{**copy.deepcopy(config_dict), **overrides})

    @classmethod
    def from_json_file(cls, path: Union[str, os.PathLike]) -> "BertConfig":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        if data.get("model_type", "bert") != "bert":
            raise ValueError(f"{path} describes a {data['model_type']!r} model, not 'bert'")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **overrides) -> "BertConfig":
        """From a directory holding config.json, or from the JSON file itself."""
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path}")
        config = cls.from_json_file(file)
        for key, value in overrides.items():
            setattr(config, key, value)
        config.validate()
        return config

    def to_dict(self) -> Dict[str, Any]:
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if not k.startswith("_")}
        out["id2label"] = dict(self.id2label)  # int keys in memory, as HF's; JSON writes them as strings
        out["model_type"] = self.model_type
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def __eq__(self, other) -> bool:
        return isinstance(other, BertConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"BertConfig {self.to_json_string()}"
