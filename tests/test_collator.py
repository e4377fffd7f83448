"""The MLM collator: BERT's masking proportions on a large batch (within 5 sigma), special
tokens and padding never touched, labels only where chosen, seeded and batch-independent."""

import math

import pytest
import torch

from fastbert.training import MLMCollator

VOCAB = 1000
PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
SPECIAL = [PAD, UNK, CLS, SEP, MASK]


def _examples(n, seed=0, max_len=128):
    g = torch.Generator().manual_seed(seed)
    normal = torch.tensor([i for i in range(VOCAB) if i not in SPECIAL])
    out = []
    for i in range(n):
        length = int(torch.randint(8, max_len + 1, (1,), generator=g))
        ids = normal[torch.randint(len(normal), (length,), generator=g)]
        split = int(torch.randint(2, length - 2, (1,), generator=g))
        ids[0], ids[split], ids[-1] = CLS, SEP, SEP
        ids[torch.rand(length, generator=g) < 0.02] = UNK  # special tokens inside the text too
        types = torch.zeros(length, dtype=torch.long)
        types[split + 1:] = 1
        out.append({"input_ids": ids, "token_type_ids": types, "next_sentence_label": i % 2, "index": i})
    return out


def _collator(**kw):
    return MLMCollator(pad_token_id=PAD, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIAL, **kw)


def _within(count, n, p, what, sigmas=5.0):
    sd = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= sigmas * sd, f"{what}: {count} of {n}, expected {n * p:.0f} ± {sigmas * sd:.0f}"


def test_masking_proportions_and_untouched_tokens():
    examples = _examples(600)
    batch = _collator(seed=1)(examples)
    original = torch.full_like(batch["input_ids"], PAD)
    for row, e in enumerate(examples):
        original[row, :len(e["input_ids"])] = e["input_ids"]
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
    special = torch.isin(original, torch.tensor(SPECIAL))
    eligible = mask & ~special
    chosen = labels != -100

    # Never a special token or padding; labels hold the original token where chosen.
    assert not (chosen & ~eligible).any()
    assert torch.equal(labels[chosen], original[chosen])
    assert torch.equal(ids[~chosen], original[~chosen]), "a token that was not chosen changed"
    assert (ids[~mask] == PAD).all() and (batch["token_type_ids"][~mask] == 0).all()

    n = int(eligible.sum())
    _within(int(chosen.sum()), n, 0.15, "chosen")
    picked = ids[chosen]
    m = int(chosen.sum())
    masked = picked == MASK
    unchanged = picked == original[chosen]
    random = ~masked & ~unchanged
    pool = VOCAB - len(SPECIAL)
    _within(int(masked.sum()), m, 0.8, "[MASK]")
    # A random draw equals the original token 1/pool of the time and then looks unchanged.
    _within(int(random.sum()), m, 0.1 * (1 - 1 / pool), "random")
    _within(int(unchanged.sum()), m, 0.1 + 0.1 / pool, "unchanged")
    assert not torch.isin(picked[random], torch.tensor(SPECIAL)).any(), "a random replacement was a special token"
    # Random replacements spread over the vocabulary rather than a few ids.
    assert len(torch.unique(picked[random])) > 0.5 * int(random.sum())


def test_batch_layout():
    examples = _examples(5, max_len=20)
    batch = _collator(pad_to_multiple_of=8)(examples)
    longest = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == (5, -(-longest // 8) * 8)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert torch.equal(batch["token_type_ids"][row, :n], e["token_type_ids"])
    assert batch["next_sentence_label"].tolist() == [0, 1, 0, 1, 0]
    assert all(t.dtype == torch.long for t in batch.values())


def test_seeded_and_independent_of_batching():
    examples = _examples(12)
    a = _collator(seed=5)(examples)
    assert all(torch.equal(a[k], _collator(seed=5)(examples)[k]) for k in a)
    assert not torch.equal(a["labels"], _collator(seed=6)(examples)["labels"])
    # An example with an index masks the same way in any batch and any position in it.
    collator = _collator(seed=5)
    alone = collator([examples[7]])
    mixed = collator([examples[3], examples[7]])
    n = len(examples[7]["input_ids"])
    assert torch.equal(alone["input_ids"][0, :n], mixed["input_ids"][1, :n])
    assert torch.equal(alone["labels"][0, :n], mixed["labels"][1, :n])
    # A new epoch masks afresh.
    collator.set_epoch(1)
    assert not torch.equal(collator([examples[7]])["labels"], alone["labels"])
    # Without an index, examples draw in order from the collator's own generator.
    plain = [{k: v for k, v in e.items() if k != "index"} for e in examples]
    c1, c2 = _collator(seed=9), _collator(seed=9)
    first, second = c1(plain), c1(plain)
    assert not torch.equal(first["labels"], second["labels"])
    assert torch.equal(c2(plain)["labels"], first["labels"])


def test_bad_input_is_named():
    collator = _collator()
    with pytest.raises(ValueError, match="empty"):
        collator([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        collator([{"input_ids": torch.tensor([CLS, VOCAB + 5, SEP])}])
    with pytest.raises(ValueError, match="mlm_probability"):
        _collator(mlm_probability=0.0)
    with pytest.raises(ValueError, match="tokenizer"):
        MLMCollator(pad_token_id=0)



def test_examples_padded_already_keep_their_mask():
    """Rows that arrive padded (a tokenizer's padding="max_length") keep their attention
    mask, and their padding is never chosen for prediction."""
    rows = []
    for example in _examples(6, max_len=20):
        n = len(example["input_ids"])
        ids = torch.cat([example["input_ids"], torch.full((24 - n,), PAD)])
        rows.append({"input_ids": ids, "attention_mask": (torch.arange(24) < n).long(), "index": example["index"]})
    batch = _collator(mlm_probability=0.9, seed=0)(rows)
    assert torch.equal(batch["attention_mask"], torch.stack([r["attention_mask"] for r in rows]))
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
