"""The vocabulary side of BertTokenizer: ids and tokens, the special tokens, and tokens added
after training (``add_tokens``, ``add_special_tokens``), as Hugging Face's fast tokenizers
do them. A model takes the grown vocabulary with ``model.resize_token_embeddings(len(tok))``."""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from tokenizers import AddedToken, Tokenizer, processors

SPECIAL_DEFAULTS = dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                        mask_token="[MASK]")
# Keys of the further special tokens (entity markers and the like): HF 4.x's and HF 5.x's names.
EXTRA_SPECIAL_KEYS = ("additional_special_tokens", "extra_special_tokens")

TokenLike = Union[str, AddedToken]


class Vocabulary:
    """Mixed into BertTokenizer, which sets ``_tok`` (a ``tokenizers.Tokenizer``),
    ``special_tokens`` (name -> token), ``extra_special_tokens`` and ``do_lower_case``."""

    _tok: Tokenizer
    special_tokens: Dict[str, str]
    extra_special_tokens: List[str]

    @property
    def vocab_size(self) -> int:
        """The trained vocabulary's size, without added tokens (``len(tokenizer)`` counts them)."""
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> Dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def get_added_vocab(self) -> Dict[str, int]:
        """The tokens matched whole before WordPiece runs (the special tokens and those given
        to ``add_tokens``, some of which may be in the trained vocabulary too), with their ids."""
        return {t.content: i for i, t in sorted(self._tok.get_added_tokens_decoder().items())}

    def __getattr__(self, name: str):
        # cls_token / cls_token_id and friends for every special token.
        if name.endswith("_token_id") and name[:-3] in SPECIAL_DEFAULTS:
            return self._tok.token_to_id(self.special_tokens[name[:-3]])
        if name in SPECIAL_DEFAULTS and "special_tokens" in self.__dict__:
            return self.special_tokens[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def all_special_tokens(self) -> List[str]:
        return list(dict.fromkeys([*self.special_tokens.values(), *self.extra_special_tokens]))

    @property
    def all_special_ids(self) -> List[int]:
        return [self._tok.token_to_id(t) for t in self.all_special_tokens]

    @property
    def additional_special_tokens(self) -> List[str]:
        return list(self.extra_special_tokens)

    def convert_tokens_to_ids(self, tokens: Union[str, Iterable[str]]) -> Union[int, List[int]]:
        unk = self.unk_token_id
        if isinstance(tokens, str):
            found = self._tok.token_to_id(tokens)
            return unk if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: Union[int, Iterable[int]]) -> Union[str, List[str]]:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, int):
            token = self._tok.id_to_token(ids)
            if token is None:
                raise ValueError(f"token id {ids} is outside the vocabulary (size {len(self)})")
            return token
        return [self.convert_ids_to_tokens(int(i)) for i in ids]

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Word pieces joined back into text (``##`` pieces glued on), as the decoder does."""
        if self._tok.decoder is None:
            return " ".join(tokens).replace(" ##", "")
        return self._tok.decoder.decode(list(tokens))

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 2

    def get_special_tokens_mask(self, token_ids_0: Sequence[int], token_ids_1: Optional[Sequence[int]] = None,
                                already_has_special_tokens: bool = False) -> List[int]:
        """1 for special tokens, 0 for the others: of ids that already hold them (any special
        id, [UNK] included, as Hugging Face marks them), or of the ``[CLS] A [SEP] B [SEP]``
        sequence that one or two unformatted id lists would make."""
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError("ids that already hold their special tokens come as one sequence")
            special = set(self.all_special_ids)
            return [1 if int(i) in special else 0 for i in token_ids_0]
        mask = [1] + [0] * len(token_ids_0) + [1]
        return mask if token_ids_1 is None else mask + [0] * len(token_ids_1) + [1]

    # -- growing the vocabulary ---------------------------------------------------------------
    def add_tokens(self, new_tokens: Union[TokenLike, Sequence[TokenLike]], special_tokens: bool = False) -> int:
        """Add whole tokens after the vocabulary's last id; return how many the backend added.

        Text that contains an added token yields its id and is never split into word pieces
        there. Ordinary added tokens match the normalised (lower-cased for uncased models)
        text; ``special_tokens=True`` adds them as special: matched verbatim, skipped by
        ``decode(skip_special_tokens=True)``, never masked by the MLM collator."""
        tokens = [new_tokens] if isinstance(new_tokens, (str, AddedToken)) else list(new_tokens)
        for t in tokens:
            if not isinstance(t, (str, AddedToken)) or not str(t):
                raise ValueError(f"tokens to add must be non-empty strings or tokenizers.AddedToken, got {t!r}")
        tokens = [AddedToken(t, special=special_tokens, normalized=not special_tokens) if isinstance(t, str) else t
                  for t in tokens]
        if not special_tokens:
            return self._tok.add_tokens(tokens)
        added = self._tok.add_special_tokens(tokens)
        named = set(self.special_tokens.values())
        self.extra_special_tokens += [t.content for t in tokens
                                      if t.content not in named and t.content not in self.extra_special_tokens]
        return added

    def add_special_tokens(self, special_tokens_dict: Mapping[str, Union[TokenLike, Sequence[TokenLike]]],
                           replace_additional_special_tokens: bool = True) -> int:
        """Set special tokens by name (``{"pad_token": "[PAD2]"}``) or add further ones
        (``{"additional_special_tokens": ["[E1]", "[/E1]"]}``), adding to the vocabulary those
        it lacks; return how many were added. As in Hugging Face's BertTokenizerFast, the
        ``[CLS] A [SEP] B [SEP]`` template keeps the tokens it was built with."""
        added = 0
        for key, value in special_tokens_dict.items():
            if key in EXTRA_SPECIAL_KEYS:
                values = [value] if isinstance(value, (str, AddedToken)) else list(value)
                if replace_additional_special_tokens:
                    self.extra_special_tokens = []
                added += self.add_tokens(values, special_tokens=True)
            elif key in SPECIAL_DEFAULTS:
                if not isinstance(value, (str, AddedToken)):
                    raise ValueError(f"{key} must be one token, got {value!r}")
                added += self.add_tokens([value], special_tokens=True)
                self.special_tokens[key] = str(value)
                self.extra_special_tokens = [t for t in self.extra_special_tokens if t != str(value)]
            else:
                raise ValueError(f"unknown special token key {key!r}: use one of "
                                 f"{', '.join([*SPECIAL_DEFAULTS, *EXTRA_SPECIAL_KEYS])}")
        return added

    def _set_template(self) -> None:
        """``[CLS] A [SEP]`` and ``[CLS] A [SEP] B [SEP]`` with token types 0 and 1."""
        cls, sep = self.special_tokens["cls_token"], self.special_tokens["sep_token"]
        self._tok.post_processor = processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, self._tok.token_to_id(cls)), (sep, self._tok.token_to_id(sep))])
