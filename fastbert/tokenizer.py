"""BertTokenizer: a thin wrapper over the ``tokenizers`` library's WordPiece that returns
what fastbert's models take: ``[CLS] A [SEP]`` or ``[CLS] A [SEP] B [SEP]`` with token
types 0/1, truncated and padded like Hugging Face's ``BertTokenizerFast``, as lists or
tensors, or packed (no padding, ``cu_seqlens``) for variable-length batches."""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordPiece

from .encoding import PAD_VALUES, BatchEncoding, pad_encoded, pad_rows, tensor
from .pretrained import HUB_LOADING_KWARGS
from .vocabulary import EXTRA_SPECIAL_KEYS, SPECIAL_DEFAULTS, Vocabulary

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS = "added_tokens.json"

_TRUNCATION = {True: "longest_first", "longest_first": "longest_first", "only_first": "only_first",
               "only_second": "only_second", False: None, "do_not_truncate": None}
_PADDING = {True: "longest", "longest": "longest", "max_length": "max_length", False: None, "do_not_pad": None}

TextInput = Union[str, Sequence[str]]


def _read_json(file: str) -> Dict[str, Any]:
    """A JSON object from ``file``; a clear error naming the file otherwise."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"could not read {file}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    return data


def _special_token(value) -> Optional[str]:
    # tokenizer_config.json may hold a special token as a string or as an AddedToken dict.
    return value.get("content") if isinstance(value, dict) else value


class BertTokenizer(Vocabulary):
    """WordPiece tokenizer for BERT.

    Build it from a vocab file (``BertTokenizer("vocab.txt")``), or with
    :meth:`from_pretrained` from a directory holding ``tokenizer.json`` or ``vocab.txt``
    (plus ``tokenizer_config.json``'s ``do_lower_case`` / ``model_max_length``).
    Calling it follows Hugging Face: ``tok(texts, pairs, truncation=True, max_length=128,
    padding=True, return_tensors="pt")``.
    """

    def __init__(self, vocab_file: Optional[Union[str, os.PathLike]] = None, *, do_lower_case: bool = True,
                 model_max_length: int = 512, strip_accents: Optional[bool] = None,
                 tokenize_chinese_chars: bool = True, tokenizer_object: Optional[Tokenizer] = None,
                 additional_special_tokens: Sequence[str] = (), **special_tokens: str):
        unknown = set(special_tokens) - set(SPECIAL_DEFAULTS)
        if unknown:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(unknown))}")
        self.special_tokens = {k: special_tokens.get(k) or v for k, v in SPECIAL_DEFAULTS.items()}
        self.do_lower_case = bool(do_lower_case)
        self.model_max_length = int(model_max_length)
        if (vocab_file is None) == (tokenizer_object is None):
            raise ValueError("give exactly one of vocab_file or tokenizer_object")
        if tokenizer_object is None:
            tokenizer_object = self._from_vocab(os.fspath(vocab_file), strip_accents, tokenize_chinese_chars)
        else:
            self._match_lowercase(tokenizer_object, strip_accents)
        self._tok = tokenizer_object
        # The backend's truncation setting is shared state; calls set it under this lock.
        self._tok.no_truncation()
        self._tok.no_padding()
        self._lock = threading.Lock()
        missing = [t for t in self.special_tokens.values() if self._tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"the vocabulary lacks the special tokens {missing}")
        self._tok.add_special_tokens(list(self.special_tokens.values()))
        self.extra_special_tokens: List[str] = []
        if additional_special_tokens:
            self.add_tokens(list(additional_special_tokens), special_tokens=True)
        self._set_template()

    def _from_vocab(self, vocab_file: str, strip_accents, tokenize_chinese_chars) -> Tokenizer:
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"no vocab file at {vocab_file}")
        # One token per line, its id the line number (a repeated token keeps its last line), as in HF.
        vocab: Dict[str, int] = {}
        try:
            with open(vocab_file, encoding="utf-8") as f:
                for index, line in enumerate(f):
                    vocab[line.rstrip("\n")] = index
        except UnicodeDecodeError as exc:
            raise ValueError(f"{vocab_file} is not UTF-8 text: {exc}") from None
        if not vocab:
            raise ValueError(f"{vocab_file} holds no tokens")
        unk = self.special_tokens["unk_token"]
        if unk not in vocab:
            raise ValueError(f"{vocab_file} lacks the unknown token {unk!r}")
        tok = Tokenizer(WordPiece(vocab, unk_token=unk, continuing_subword_prefix="##", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=tokenize_chinese_chars,
                                                    strip_accents=strip_accents, lowercase=self.do_lower_case)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        return tok

    def _match_lowercase(self, tok: Tokenizer, strip_accents) -> None:
        # A tokenizer.json whose normalizer disagrees with tokenizer_config.json's
        # do_lower_case is rebuilt with the config's choice, as transformers does.
        state = json.loads(tok.normalizer.__getstate__()) if tok.normalizer is not None else {}
        if state.get("type") != "BertNormalizer":
            return
        if state.get("lowercase") != self.do_lower_case or (strip_accents is not None and state.get("strip_accents") != strip_accents):
            tok.normalizer = normalizers.BertNormalizer(
                clean_text=state.get("clean_text", True), handle_chinese_chars=state.get("handle_chinese_chars", True),
                strip_accents=state.get("strip_accents") if strip_accents is None else strip_accents,
                lowercase=self.do_lower_case)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **overrides) -> "BertTokenizer":
        """From a directory (tokenizer.json preferred, else vocab.txt; tokenizer_config.json
        and special_tokens_map.json when present) or from a vocab file. ``subfolder`` is
        joined to ``path``; Hugging Face's download options and ``use_fast`` are accepted
        and ignored."""
        path = os.fspath(path)
        subfolder = overrides.pop("subfolder", None)
        if subfolder:
            path = os.path.join(path, subfolder)
        for key in (*HUB_LOADING_KWARGS, "use_fast"):
            overrides.pop(key, None)
        if os.path.isfile(path):
            return cls(path, **overrides)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no tokenizer directory or vocab file at {path}")
        settings: Dict[str, Any] = {}
        for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):
            file = os.path.join(path, name)
            if os.path.isfile(file):
                data = _read_json(file)
                for key in SPECIAL_DEFAULTS:
                    if data.get(key) is not None:
                        settings[key] = _special_token(data[key])
                for key in EXTRA_SPECIAL_KEYS:
                    if data.get(key):
                        settings["additional_special_tokens"] = [_special_token(t) for t in data[key]]
                for key in ("do_lower_case", "model_max_length", "strip_accents", "tokenize_chinese_chars"):
                    if data.get(key) is not None:
                        settings[key] = data[key]
        # Configs without a real limit store a huge sentinel; BERT's positions stop at 512.
        if int(settings.get("model_max_length", 512)) > 1_000_000:
            settings["model_max_length"] = 512
        settings.update(overrides)
        tokenizer_file = os.path.join(path, TOKENIZER_FILE)
        if os.path.isfile(tokenizer_file):
            settings.pop("tokenize_chinese_chars", None)
            try:
                tokenizer_object = Tokenizer.from_file(tokenizer_file)
            except Exception as exc:  # the tokenizers library raises a bare Exception
                raise ValueError(f"could not read {tokenizer_file}: {exc}") from None
            return cls(tokenizer_object=tokenizer_object, **settings)
        vocab_file = os.path.join(path, VOCAB_FILE)
        if os.path.isfile(vocab_file):
            return cls._from_vocab_dir(vocab_file, os.path.join(path, ADDED_TOKENS), settings)
        raise FileNotFoundError(f"no {TOKENIZER_FILE} or {VOCAB_FILE} in {path}")

    @classmethod
    def _from_vocab_dir(cls, vocab_file: str, added_file: str, settings: Dict[str, Any]) -> "BertTokenizer":
        """vocab.txt, then the tokens of added_tokens.json at their ids (special if named so)."""
        extras = list(settings.pop("additional_special_tokens", ()))
        tok = cls(vocab_file, **settings)
        if os.path.isfile(added_file):
            added = _read_json(added_file)
            for token, index in sorted(added.items(), key=lambda kv: kv[1]):
                tok.add_tokens([token], special_tokens=token in extras)
                if tok._tok.token_to_id(token) != index:
                    raise ValueError(f"{added_file}: {token!r} should have id {index}, but the vocabulary gives it "
                                     f"{tok._tok.token_to_id(token)}")
        if extras:
            tok.add_tokens(extras, special_tokens=True)
        return tok

    def tokenize(self, text: str, pair: Optional[str] = None, add_special_tokens: bool = False) -> List[str]:
        return self._encode([text], None if pair is None else [pair], add_special_tokens, None, None)[0].tokens

    def __getstate__(self):
        # Pickling (spawned DataLoader workers, deepcopy) takes everything but the lock.
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- encoding -----------------------------------------------------------------------
    def _encode(self, texts: List[str], pairs: Optional[List[str]], add_special_tokens: bool,
                truncation: Optional[str], max_length: Optional[int], stride: int = 0, words: bool = False):
        with self._lock:
            if truncation is None:
                self._tok.no_truncation()
            else:
                self._tok.enable_truncation(max_length, stride=stride, strategy=truncation)
            try:
                inputs = texts if pairs is None else list(zip(texts, pairs))
                return self._tok.encode_batch(inputs, is_pretokenized=words, add_special_tokens=add_special_tokens)
            except Exception as exc:  # the Rust side reports truncation that cannot fit as a plain Exception
                raise ValueError(f"could not encode with truncation={truncation!r}, max_length={max_length}: {exc}") from None
            finally:
                self._tok.no_truncation()

    def __call__(self, text: Union[TextInput, Sequence[Tuple[str, str]]], text_pair: Optional[TextInput] = None, *,
                 add_special_tokens: bool = True, padding: Union[bool, str] = False,
                 truncation: Union[bool, str, None] = None, max_length: Optional[int] = None,
                 pad_to_multiple_of: Optional[int] = None, return_tensors: Optional[str] = None,
                 return_attention_mask: bool = True, return_token_type_ids: bool = True,
                 return_offsets_mapping: bool = False, return_overflowing_tokens: bool = False, stride: int = 0,
                 return_special_tokens_mask: bool = False, return_length: bool = False,
                 is_split_into_words: bool = False, packed: bool = False) -> BatchEncoding:
        """Encode one text, a pair, or a batch of either.

        ``padding``: False (none), True / "longest" (to the longest in the batch) or
        "max_length". ``truncation``: True / "longest_first" (trim the longer of a pair one
        token at a time), "only_first", "only_second" or False; it cuts at ``max_length``,
        or at ``model_max_length`` when that is not given. ``return_tensors="pt"`` (or ``"np"``, NumPy arrays) gives
        int64 tensors. ``packed=True`` concatenates the sequences without padding and adds
        ``position_ids``, int32 ``cu_seqlens`` (B+1) and ``max_seqlen``.

        ``return_offsets_mapping`` adds each token's (start, end) characters in its own text
        ((0, 0) for special and padding tokens). ``return_overflowing_tokens`` keeps what
        truncation cuts as further rows, each window sharing ``stride`` tokens with the one
        before, and adds ``overflow_to_sample_mapping`` (the input each row came from): the
        sliding windows of question answering over long contexts. ``is_split_into_words``
        takes each text as a list of words (token tagging's input; ``word_ids`` then indexes
        that list). ``return_special_tokens_mask`` marks the template's [CLS] and [SEP] and the
        padding with 1 (what Hugging Face's MLM collator reads); ``return_length`` gives each
        row's length (after padding), as a list even for one text.
        """
        texts, pairs, single = (self._as_word_batch if is_split_into_words else self._as_batch)(text, text_pair)
        if truncation not in _TRUNCATION and truncation is not None:
            raise ValueError(f"truncation must be one of {list(_TRUNCATION)}, got {truncation!r}")
        if padding not in _PADDING:
            raise ValueError(f"padding must be one of {list(_PADDING)}, got {padding!r}")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
        strategy = _TRUNCATION[truncation] if truncation is not None else None
        pad = _PADDING[padding]
        if max_length is not None and (not isinstance(max_length, int) or max_length <= 0):
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if (strategy is not None or pad == "max_length") and max_length is None:
            max_length = self.model_max_length
        if strategy == "only_second" and pairs is None:
            raise ValueError("truncation='only_second' needs text pairs")
        if packed and pad is not None:
            raise ValueError("packed=True concatenates sequences without padding; leave padding=False")
        if not isinstance(stride, int) or stride < 0:
            raise ValueError(f"stride must be a non-negative int, got {stride!r}")
        if stride and strategy is None:
            raise ValueError("stride sets the overlap of the windows that truncation cuts; pass truncation too")
        if strategy is not None and stride >= max_length:
            raise ValueError(f"stride ({stride}) must be smaller than max_length ({max_length})")
        special = (3 if pairs is not None else 2) if add_special_tokens else 0  # [CLS] A [SEP] (B [SEP])
        if strategy is not None and max_length < special:
            raise ValueError(f"max_length={max_length} is shorter than the {special} special tokens alone: "
                             "the input could not be truncated to it")
        encodings = self._encode(texts, pairs, add_special_tokens, strategy, max_length, stride, is_split_into_words)
        sample = list(range(len(encodings)))
        if return_overflowing_tokens:  # each input's windows follow it, as in Hugging Face's fast tokenizers
            sample = [i for i, e in enumerate(encodings) for _ in range(1 + len(e.overflowing))]
            encodings = [w for e in encodings for w in [e, *e.overflowing]]
        ids = [e.ids for e in encodings]
        types = [e.type_ids for e in encodings]
        extra = {}
        if return_offsets_mapping:
            extra["offset_mapping"] = [[tuple(o) for o in e.offsets] for e in encodings]
        if return_overflowing_tokens:
            extra["overflow_to_sample_mapping"] = sample
        if return_special_tokens_mask:
            extra["special_tokens_mask"] = [list(e.special_tokens_mask) for e in encodings]
        if packed:
            return self._packed(ids, types, return_tensors, return_token_type_ids, extra)
        masks = [[1] * len(x) for x in ids]
        rows = {"input_ids": ids, "token_type_ids": types, "attention_mask": masks, **extra}
        if pad is not None:
            target = max_length if pad == "max_length" else max(len(x) for x in ids)
            if pad_to_multiple_of:
                target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
            side = "left" if self._pad_left() else "right"
            pad_rows(rows, dict(PAD_VALUES, input_ids=self.pad_token_id, offset_mapping=(0, 0)), side, target)
        ids, types, masks = rows["input_ids"], rows["token_type_ids"], rows["attention_mask"]
        extra = {k: rows[k] for k in extra}
        out = {"input_ids": ids}
        if return_token_type_ids:
            out["token_type_ids"] = types
        if return_attention_mask:
            out["attention_mask"] = masks
        out.update(extra)
        lengths = [len(x) for x in ids] if return_length else None
        if return_tensors is not None:
            if len({len(x) for x in ids}) > 1:
                raise ValueError("sequences of different lengths cannot form one tensor; "
                                 "pass padding=True (or padding='max_length'), or packed=True")
            if return_length:
                out["length"] = lengths
            return BatchEncoding({k: tensor(v, return_tensors, torch.long) for k, v in out.items()}, encodings,
                                 pad is not None and self._pad_left())
        if single and not return_overflowing_tokens:
            out = {k: v[0] for k, v in out.items()}
        if return_length:
            out["length"] = lengths
        return BatchEncoding(out, encodings, pad is not None and self._pad_left())

    @staticmethod
    def _as_word_batch(text, text_pair) -> Tuple[List[List[str]], Optional[List[List[str]]], bool]:
        """Texts given as lists of words: one list (a single text) or a list of lists."""
        def is_words(t):
            return isinstance(t, (list, tuple)) and all(isinstance(w, str) for w in t)
        single = is_words(text)
        texts = [list(text)] if single else list(text) if isinstance(text, (list, tuple)) else None
        if not texts or not all(is_words(t) for t in texts):
            raise TypeError("with is_split_into_words=True, text must be a list of words or a list of such lists")
        if text_pair is None:
            return texts, None, single
        pairs = [list(text_pair)] if single else list(text_pair)
        if len(pairs) != len(texts) or not all(is_words(t) for t in pairs):
            raise ValueError(f"text_pair must hold one list of words per text ({len(texts)})")
        return texts, pairs, single

    @staticmethod
    def _as_batch(text, text_pair) -> Tuple[List[str], Optional[List[str]], bool]:
        if isinstance(text, str):
            if text_pair is not None and not isinstance(text_pair, str):
                raise TypeError("text is one string, so text_pair must be one string too")
            return [text], None if text_pair is None else [text_pair], True
        if not isinstance(text, (list, tuple)) or not text:
            raise TypeError(f"text must be a string or a non-empty list of strings, got {type(text).__name__}")
        if all(isinstance(t, (list, tuple)) and len(t) == 2 for t in text):
            if text_pair is not None:
                raise TypeError("give pairs either as (a, b) tuples or as text_pair, not both")
            text, text_pair = [t[0] for t in text], [t[1] for t in text]
        texts = list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("every text must be a string")
        if text_pair is None:
            return texts, None, False
        pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
        if len(pairs) != len(texts) or not all(isinstance(t, str) for t in pairs):
            raise ValueError(f"text_pair must hold one string per text ({len(texts)}), got {len(pairs)}")
        return texts, pairs, False

    @staticmethod
    def _packed(ids, types, return_tensors, return_token_type_ids, extra) -> BatchEncoding:
        lengths = [len(x) for x in ids]
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        out = {"input_ids": [i for x in ids for i in x]}
        if return_token_type_ids:
            out["token_type_ids"] = [t for x in types for t in x]
        out["position_ids"] = [p for n in lengths for p in range(n)]
        if "offset_mapping" in extra:
            out["offset_mapping"] = [o for x in extra["offset_mapping"] for o in x]
        if "overflow_to_sample_mapping" in extra:
            out["overflow_to_sample_mapping"] = extra["overflow_to_sample_mapping"]
        if "special_tokens_mask" in extra:
            out["special_tokens_mask"] = [m for x in extra["special_tokens_mask"] for m in x]
        if return_tensors is not None:
            out = {k: tensor(v, return_tensors, torch.long) for k, v in out.items()}
            out["cu_seqlens"] = tensor(cu, return_tensors, torch.int32)
        else:
            out["cu_seqlens"] = cu
        out["max_seqlen"] = max(lengths)
        return BatchEncoding(out)

    # -- padding encoded inputs (what Hugging Face's data collators call) -------------------
    padding_side = "right"
    model_input_names = ["input_ids", "token_type_ids", "attention_mask"]

    def _pad_left(self) -> bool:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        return self.padding_side == "left"

    def pad(self, encoded_inputs, padding: Union[bool, str] = True, max_length: Optional[int] = None,
            pad_to_multiple_of: Optional[int] = None, return_attention_mask: Optional[bool] = None,
            return_tensors: Optional[str] = None, **_ignored) -> BatchEncoding:
        """Pad already-encoded inputs, as Hugging Face's ``tokenizer.pad`` does for its data
        collators (``DataCollatorWithPadding(tokenizer)`` works with this tokenizer): a list
        of per-example dicts or a dict of lists. ``input_ids``, ``token_type_ids``,
        ``attention_mask`` (made when missing) and ``special_tokens_mask`` are padded on
        ``padding_side``; other keys (labels…) pass through."""
        if padding not in _PADDING:
            raise ValueError(f"padding must be one of {list(_PADDING)}, got {padding!r}")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
        self._pad_left()
        return pad_encoded(encoded_inputs, dict(PAD_VALUES, input_ids=self.pad_token_id), self.padding_side,
                           _PADDING[padding], max_length, pad_to_multiple_of, return_attention_mask, return_tensors)

    def encode(self, text: str, text_pair: Optional[str] = None, *, add_special_tokens: bool = True,
               truncation: Union[bool, str, None] = None, max_length: Optional[int] = None) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes one string, got {type(text).__name__}; call the tokenizer for batches")
        return self(text, text_pair, add_special_tokens=add_special_tokens, truncation=truncation,
                    max_length=max_length, return_attention_mask=False, return_token_type_ids=False)["input_ids"]

    def decode(self, ids: Union[Sequence[int], torch.Tensor], skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch, skip_special_tokens: bool = False) -> List[str]:
        if isinstance(batch, torch.Tensor):
            batch = batch.tolist()
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # -- saving -------------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, os.PathLike], **_hub_options) -> Tuple[str, ...]:
        """tokenizer.json, vocab.txt, tokenizer_config.json and special_tokens_map.json (and
        added_tokens.json when tokens were added), the files Hugging Face's tokenizers read;
        returns their paths, as Hugging Face does."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        written = [os.path.join(directory, TOKENIZER_FILE), os.path.join(directory, VOCAB_FILE)]
        self._tok.save(written[0])
        vocab = sorted(self._tok.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
        with open(written[1], "w", encoding="utf-8") as f:
            f.writelines(token + "\n" for token, _ in vocab)
        extras = {"extra_special_tokens": list(self.extra_special_tokens)} if self.extra_special_tokens else {}
        files = {TOKENIZER_CONFIG: dict(tokenizer_class="BertTokenizer", do_lower_case=self.do_lower_case,
                                        model_max_length=self.model_max_length, **self.special_tokens, **extras),
                 SPECIAL_TOKENS_MAP: dict(self.special_tokens, **{"additional_special_tokens": v for v in extras.values()})}
        added = {t: i for t, i in self.get_added_vocab().items() if t not in self.special_tokens.values()}
        if added:
            files[ADDED_TOKENS] = added
        for name, data in files.items():
            written.append(os.path.join(directory, name))
            with open(written[-1], "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False)
        return tuple(written)

    def __repr__(self) -> str:
        return (f"BertTokenizer(vocab_size={self.vocab_size}, do_lower_case={self.do_lower_case}, "
                f"model_max_length={self.model_max_length})")
