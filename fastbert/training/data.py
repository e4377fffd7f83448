"""Pre-training examples, as in the original BERT recipe (``create_pretraining_data.py``).

A corpus is plain text: one sentence per line, a blank line between documents (and each
file ends a document). Each document's sentences are gathered into chunks of about
``max_seq_length - 3`` tokens; a chunk is split at a random sentence into segment A and
segment B. Half the time B is replaced by text from a random other document (next sentence
label 1, as in Hugging Face; 0 means B really follows A). Sentences a random B did not use
go back to the document for the next chunk. The longer segment is trimmed, one token at a
time from a random end, until the pair fits. Masking happens later, per batch, in
:class:`~fastbert.training.collator.MLMCollator`.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Dict, List, Sequence, Union

import torch
from torch.utils.data import Dataset

PathLike = Union[str, os.PathLike]


def read_documents(paths: Union[PathLike, Sequence[PathLike]]) -> List[List[str]]:
    """Documents (lists of sentences) from text files: one sentence per line, blank lines
    between documents."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    documents: List[List[str]] = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no corpus file at {path}")
        current: List[str] = []
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        current.append(line)
                    elif current:
                        documents.append(current)
                        current = []
        except UnicodeDecodeError as exc:
            raise ValueError(f"corpus file {path} is not UTF-8 text: {exc}") from None
        if current:
            documents.append(current)
    return documents


@dataclass
class Example:
    """One sentence pair: ``[CLS] A [SEP] B [SEP]``, and where A and B came from
    (document index, first and one-past-last sentence) so the pairing can be checked."""

    input_ids: List[int]
    token_type_ids: List[int]
    next_sentence_label: int  # 0: B follows A; 1: B is from another document
    a_source: tuple  # (document, first sentence, end sentence)
    b_source: tuple


def _truncate_pair(a: List[int], b: List[int], max_tokens: int, rng: random.Random) -> None:
    # Trim the longer segment from a random end, so neither end is favoured as a boundary.
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def create_examples(documents: List[List[List[int]]], cls_id: int, sep_id: int, max_seq_length: int = 128,
                    short_seq_prob: float = 0.1, nsp_probability: float = 0.5, dupe_factor: int = 1,
                    seed: int = 12345) -> List[Example]:
    """Sentence-pair examples from tokenized documents (lists of sentences of token ids,
    without special tokens). Seeded: the same arguments give the same examples."""
    if max_seq_length < 5:
        raise ValueError(f"max_seq_length must be at least 5 ([CLS] A [SEP] B [SEP]), got {max_seq_length}")
    if not 0.0 <= nsp_probability <= 1.0 or not 0.0 <= short_seq_prob <= 1.0:
        raise ValueError("nsp_probability and short_seq_prob must lie in [0, 1]")
    if dupe_factor < 1:
        raise ValueError(f"dupe_factor must be at least 1 (passes over the corpus), got {dupe_factor}")
    documents = [[s for s in doc if s] for doc in documents]
    documents = [doc for doc in documents if doc]
    if len(documents) < 2:
        raise ValueError(f"next sentence prediction needs at least 2 non-empty documents, got {len(documents)}")
    rng = random.Random(seed)
    examples: List[Example] = []
    for _ in range(dupe_factor):
        for index in range(len(documents)):
            examples.extend(_document_examples(documents, index, cls_id, sep_id, max_seq_length,
                                               short_seq_prob, nsp_probability, rng))
    rng.shuffle(examples)
    return examples


def _document_examples(documents, index, cls_id, sep_id, max_seq_length, short_seq_prob, nsp_probability, rng):
    document = documents[index]
    max_tokens = max_seq_length - 3
    # Some shorter sequences, so the model also sees the lengths fine-tuning will give it.
    target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
    out = []
    chunk: List[int] = []  # sentence indices
    length = 0
    i = 0
    while i < len(document):
        chunk.append(i)
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            a = [t for s in chunk[:a_end] for t in document[s]]
            a_source = (index, chunk[0], chunk[0] + a_end)
            if len(chunk) == 1 or rng.random() < nsp_probability:
                label = 1
                other = rng.randrange(len(documents) - 1)
                other += other >= index  # any document but this one
                start = rng.randrange(len(documents[other]))
                b: List[int] = []
                end = start
                while end < len(documents[other]) and len(b) < target - len(a):
                    b.extend(documents[other][end])
                    end += 1
                if not b:
                    b, end = list(documents[other][start]), start + 1
                b_source = (other, start, end)
                i -= len(chunk) - a_end  # the unused sentences start the next chunk
            else:
                label = 0
                b = [t for s in chunk[a_end:] for t in document[s]]
                b_source = (index, chunk[0] + a_end, chunk[-1] + 1)
            _truncate_pair(a, b, max_tokens, rng)
            out.append(Example([cls_id] + a + [sep_id] + b + [sep_id], [0] * (len(a) + 2) + [1] * (len(b) + 1),
                               label, a_source, b_source))
            chunk, length = [], 0
        i += 1
    return out


class PretrainingDataset(Dataset):
    """Sentence-pair examples of a corpus, held as one flat token buffer.

    ``dataset[i]`` is a dict with ``input_ids``, ``token_type_ids`` (int64 tensors),
    ``next_sentence_label`` and ``index`` (which the collator uses to seed each example's
    masking, so that it does not depend on how examples are batched or sharded).
    """

    def __init__(self, examples: List[Example]):
        if not examples:
            raise ValueError("no pre-training examples (is the corpus empty?)")
        lengths = torch.tensor([len(e.input_ids) for e in examples])
        self.offsets = torch.zeros(len(examples) + 1, dtype=torch.long)
        self.offsets[1:] = torch.cumsum(lengths, 0)
        self.input_ids = torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int32)
        # Token types are 0 through the first [SEP], then 1: one boundary per example.
        self.b_start = torch.tensor([e.token_type_ids.index(1) if 1 in e.token_type_ids else len(e.token_type_ids)
                                     for e in examples])
        self.labels = torch.tensor([e.next_sentence_label for e in examples], dtype=torch.long)
        self.sources = torch.tensor([list(e.a_source) + list(e.b_source) for e in examples], dtype=torch.long)

    @classmethod
    def from_corpus(cls, paths: Union[PathLike, Sequence[PathLike]], tokenizer, max_seq_length: int = 128,
                    short_seq_prob: float = 0.1, nsp_probability: float = 0.5, dupe_factor: int = 1,
                    seed: int = 12345) -> "PretrainingDataset":
        """Read, tokenize (``tokenizer`` is a :class:`fastbert.BertTokenizer`) and pair a corpus."""
        documents = read_documents(paths)
        tokenized = tokenize_documents(documents, tokenizer)
        return cls(create_examples(tokenized, tokenizer.cls_token_id, tokenizer.sep_token_id, max_seq_length,
                                   short_seq_prob, nsp_probability, dupe_factor, seed))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        ids = self.input_ids[self.offsets[i]:self.offsets[i + 1]].long()
        types = torch.zeros_like(ids)
        types[self.b_start[i]:] = 1
        return {"input_ids": ids, "token_type_ids": types, "next_sentence_label": self.labels[i], "index": i}

    def source(self, i: int) -> Dict[str, tuple]:
        a = tuple(self.sources[i, :3].tolist())
        b = tuple(self.sources[i, 3:].tolist())
        return {"a": a, "b": b}

    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def random_next_share(self) -> float:
        """The share of examples whose B comes from another document: ``nsp_probability``, plus
        the chunks of a single sentence, which always take a random B (as in BERT's
        create_pretraining_data.py), so more with short documents or short sequences."""
        return float(self.labels.float().mean()) if len(self.labels) else 0.0


def tokenize_documents(documents: List[List[str]], tokenizer, batch_size: int = 4096) -> List[List[List[int]]]:
    """Each sentence as WordPiece ids, without special tokens."""
    flat = [s for doc in documents for s in doc]
    ids: List[List[int]] = []
    for start in range(0, len(flat), batch_size):
        ids.extend(tokenizer(flat[start:start + batch_size], add_special_tokens=False,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"])
    out, k = [], 0
    for doc in documents:
        out.append(ids[k:k + len(doc)])
        k += len(doc)
    return out


def train_tokenizer(paths: Union[PathLike, Sequence[PathLike]], directory: PathLike, vocab_size: int = 30522,
                    lowercase: bool = True, min_frequency: int = 1, model_max_length: int = 512):
    """Learn a WordPiece vocabulary from a corpus (the ``tokenizers`` trainer), save it to
    ``directory`` and return it as a :class:`fastbert.BertTokenizer`."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece
    from tokenizers.trainers import WordPieceTrainer

    from ..tokenizer import BertTokenizer

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                               special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train([os.fspath(p) for p in paths], trainer)
    tokenizer = BertTokenizer(tokenizer_object=tok, do_lower_case=lowercase, model_max_length=model_max_length)
    tokenizer.save_pretrained(directory)
    return tokenizer


__all__ = ["Example", "PretrainingDataset", "create_examples", "read_documents", "tokenize_documents",
           "train_tokenizer"]
