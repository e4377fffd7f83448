"""Growing the vocabulary after training, against Hugging Face: tokens added to the tokenizer
(plain and special) give HF's ids and round-trip through save_pretrained; a model resized
with resize_token_embeddings keeps its rows, its tied decoder and HF's numbers, and saves a
checkpoint that HF loads."""

import os

import pytest
import torch

import fastbert
from hf_bert import check, config_kwargs, inputs, transformers, twins
from test_tokenizer import TINY_VOCAB

TEXTS = ["the Zebra sat<ent>on zebra [E1] cat [/E1] ZEBRA [e1]", "the cats", "big [/E1]bigger"]


@pytest.fixture()
def tiny_dir(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    return tmp_path


def _grow(tok):
    counts = (tok.add_tokens(["Zebra", "big", "<ent>"]),
              tok.add_special_tokens({"additional_special_tokens": ["[E1]", "[/E1]"]}))
    return counts


def _same_encoding(ours, theirs):
    a, b = ours(TEXTS, padding=True), theirs(TEXTS, padding=True)
    assert a["input_ids"] == b["input_ids"] and a["token_type_ids"] == b["token_type_ids"]
    assert a["attention_mask"] == b["attention_mask"]
    for row in a["input_ids"]:
        assert ours.decode(row, skip_special_tokens=True) == theirs.decode(row, skip_special_tokens=True)


def test_added_tokens_match_hugging_face(tiny_dir):
    ours = fastbert.BertTokenizer.from_pretrained(tiny_dir)
    theirs = transformers.BertTokenizerFast.from_pretrained(str(tiny_dir))
    assert _grow(ours) == _grow(theirs)
    assert (ours.vocab_size, len(ours)) == (theirs.vocab_size, len(theirs)) == (len(TINY_VOCAB), len(TINY_VOCAB) + 4)
    assert ours.all_special_ids == theirs.all_special_ids
    assert ours.get_added_vocab() == theirs.get_added_vocab()
    _same_encoding(ours, theirs)
    ids = ours(TEXTS[0])["input_ids"]
    assert ours.convert_tokens_to_ids("[E1]") in ids and ours.convert_tokens_to_ids("<ent>") in ids


@pytest.mark.parametrize("files", ["tokenizer.json", "vocab.txt"])
def test_added_tokens_round_trip(tiny_dir, tmp_path, files):
    tok = fastbert.BertTokenizer.from_pretrained(tiny_dir)
    _grow(tok)
    out = tmp_path / "saved"
    written = tok.save_pretrained(out)
    assert sorted(os.path.basename(p) for p in written) == sorted(os.listdir(out)) and "added_tokens.json" in os.listdir(out)
    if files == "vocab.txt":  # HF's slow-tokenizer files only: vocab.txt + added_tokens.json
        os.remove(out / "tokenizer.json")
        assert (out / "vocab.txt").read_text(encoding="utf-8").split() == TINY_VOCAB
    again = fastbert.BertTokenizer.from_pretrained(out)
    assert len(again) == len(tok) and again.all_special_tokens == tok.all_special_tokens
    _same_encoding(again, tok)
    if files == "tokenizer.json":
        _same_encoding(again, transformers.BertTokenizerFast.from_pretrained(str(out)))


def test_new_special_tokens_by_name(tiny_dir):
    ours = fastbert.BertTokenizer.from_pretrained(tiny_dir)
    theirs = transformers.BertTokenizerFast.from_pretrained(str(tiny_dir))
    for tok in (ours, theirs):
        assert tok.add_special_tokens({"cls_token": "<s>", "sep_token": "</s>"}) == 2
    assert ours.cls_token_id == theirs.cls_token_id == len(TINY_VOCAB)
    assert ours.all_special_ids == theirs.all_special_ids
    a, b = ours("the cat", "a dog"), theirs("the cat", "a dog")
    assert a["input_ids"] == b["input_ids"] and a["input_ids"][0] == TINY_VOCAB.index("[CLS]")  # HF keeps its template
    assert a["token_type_ids"] == b["token_type_ids"]


def test_bad_additions_are_named(tiny_dir):
    tok = fastbert.BertTokenizer.from_pretrained(tiny_dir)
    with pytest.raises(ValueError, match="non-empty strings"):
        tok.add_tokens(["ok", ""])
    with pytest.raises(ValueError, match="non-empty strings"):
        tok.add_tokens([3])
    with pytest.raises(ValueError, match="unknown special token key 'eos'"):
        tok.add_special_tokens({"eos": "</s>"})
    with pytest.raises(ValueError, match="pad_token must be one token"):
        tok.add_special_tokens({"pad_token": ["a", "b"]})
    assert len(tok) == len(TINY_VOCAB)  # nothing half-added


CFG = config_kwargs("h32-4h-2l-relu")


@pytest.mark.parametrize("cls", ["BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification"])
@pytest.mark.parametrize("size,multiple", [(101, None), (60, None), (99, 8), (None, 64)], ids=str)
def test_resize_matches_transformers(cls, size, multiple):
    hf, fb = twins(cls, **CFG)
    old = fb.get_input_embeddings().weight.detach().clone()
    kept_bias = fb.cls.predictions.bias.detach().clone() if hasattr(fb, "cls") else None
    a = hf.resize_token_embeddings(size, pad_to_multiple_of=multiple, mean_resizing=False)
    b = fb.resize_token_embeddings(size, pad_to_multiple_of=multiple, mean_resizing=False)
    count = a.num_embeddings
    assert b.num_embeddings == fb.config.vocab_size == hf.config.vocab_size == count
    assert b is fb.get_input_embeddings() is fb.bert.embeddings.word_embeddings and b.padding_idx == 0
    keep = min(count, old.shape[0])
    assert torch.equal(b.weight[:keep], old[:keep])
    if hasattr(fb, "cls"):
        head = fb.cls.predictions
        assert head.decoder.weight is b.weight and head.decoder.bias is head.bias
        assert head.bias.shape == (count,) and head.decoder.out_features == count
        assert torch.equal(head.bias[:keep], kept_bias[:keep]) and not head.bias[keep:].any()
    fb.load_state_dict(hf.state_dict())  # HF's fresh rows, then the same numbers
    hf.eval(), fb.eval()
    ids, tt, mask = inputs([11, 7, 3, 9], vocab=count)
    ids[0, 1] = count - 1  # the last row is read
    ours, theirs = fb(ids, attention_mask=mask, token_type_ids=tt)[0], hf(ids, attention_mask=mask, token_type_ids=tt)[0]
    if ours.dim() == 3:  # per-token logits: padded positions are not compared
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    check(f"resize:{cls}", ours, theirs)


def test_mean_resizing_and_no_op():
    _, fb = twins("BertForMaskedLM", **CFG)
    emb = fb.get_input_embeddings()
    assert fb.resize_token_embeddings() is emb and fb.resize_token_embeddings(97) is emb
    old, bias = emb.weight.detach().clone(), fb.cls.predictions.bias.detach().clone()
    fb.resize_token_embeddings(103)
    new = fb.get_input_embeddings().weight.detach()
    torch.testing.assert_close(new[97:], old.mean(0).expand(6, -1), atol=1e-4, rtol=0)
    assert torch.equal(fb.cls.predictions.bias[:97], bias) and not fb.cls.predictions.bias[97:].any()  # as HF 5


def test_resize_untied_decoder():
    """An untied decoder keeps its own weight and bias rows; transformers 5 draws the added
    bias entries around the decoder bias's mean and makes ``bias`` the decoder's bias."""
    hf, fb = twins("BertForMaskedLM", **config_kwargs("h32-4h-2l-relu", tie_word_embeddings=False))
    with torch.no_grad():
        for model in (hf, fb):
            model.cls.predictions.decoder.bias.copy_(torch.linspace(-1, 2, 97))
    decoder = fb.cls.predictions.decoder.weight.detach().clone()
    for model in (hf, fb):
        model.resize_token_embeddings(120)
    head = fb.cls.predictions.decoder
    assert head.weight.shape == (120, 32) and head.weight is not fb.get_input_embeddings().weight
    assert torch.equal(head.weight[:97], decoder)
    assert head.weight.requires_grad and head.bias.requires_grad
    assert head.bias is fb.cls.predictions.bias and hf.cls.predictions.decoder.bias is hf.cls.predictions.bias
    torch.testing.assert_close(head.bias, hf.cls.predictions.decoder.bias, atol=1e-6, rtol=0)


def test_resize_errors_name_the_problem():
    _, fb = twins("BertModel", **CFG)
    with pytest.raises(ValueError, match="new_num_tokens must be a positive int"):
        fb.resize_token_embeddings(0)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive int"):
        fb.resize_token_embeddings(100, pad_to_multiple_of="8")
    fb.config.pad_token_id = 50
    with pytest.raises(ValueError, match="would drop the padding row pad_token_id=50"):
        fb.resize_token_embeddings(40)
    assert fb.config.vocab_size == 97 == fb.get_input_embeddings().num_embeddings


def test_added_tokens_train_and_save_end_to_end(tiny_dir, tmp_path):
    """The fine-tuning recipe: add entity markers, resize, take a step, save; HF loads both."""
    tok = fastbert.BertTokenizer.from_pretrained(tiny_dir)
    _grow(tok)
    torch.manual_seed(0)
    model = fastbert.BertForMaskedLM(fastbert.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=32))
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=8)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad[tok.convert_tokens_to_ids("[E1]")].abs().sum() > 0
    model.eval().save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "model").eval()
    hf_tok = transformers.BertTokenizerFast.from_pretrained(str(tmp_path / "model"))
    assert hf.config.vocab_size == 32
    hf_batch = hf_tok(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(hf_batch["input_ids"], batch["input_ids"])
    real = batch["attention_mask"].bool()
    check("added tokens: hf logits", model(**batch).logits[real], hf(**hf_batch).logits[real])
