"""Bad input gets a ValueError that names the problem; an empty batch gives empty outputs."""

import pytest
import torch

import fastbert
from hf_bert import config_kwargs

CFG = config_kwargs("h32-4h-2l-relu")  # vocab 97, 3 token types, 24 positions


@pytest.fixture(scope="module")
def model():
    return fastbert.BertModel(fastbert.BertConfig(**CFG)).eval()


def _ids(b=2, s=7):
    return torch.randint(1, 97, (b, s))


@pytest.mark.parametrize("bad,match", [
    (lambda ids: dict(input_ids=ids.masked_fill(ids == ids[0, 3], 97)), r"input_ids contains 97, outside the valid range \[0, 97\)"),
    (lambda ids: dict(input_ids=ids.masked_fill(ids == ids[1, 2], -1)), r"input_ids contains -1"),
    (lambda ids: dict(input_ids=ids, token_type_ids=torch.full_like(ids, 3)), r"token_type_ids contains 3, outside the valid range \[0, 3\)"),
    (lambda ids: dict(input_ids=ids, position_ids=torch.full_like(ids, 24)), r"position_ids contains 24"),
    (lambda ids: dict(input_ids=torch.randint(1, 97, (2, 25))), r"sequence length 25 is longer than max_position_embeddings \(24\)"),
    (lambda ids: dict(input_ids=ids, attention_mask=torch.ones(2, 6)), r"attention_mask of shape \(2, 6\) does not fit input of shape \(2, 7\)"),
    (lambda ids: dict(input_ids=ids, attention_mask=torch.ones(3, 7)), r"attention_mask of shape \(3, 7\)"),
    (lambda ids: dict(input_ids=ids, attention_mask=torch.ones(2, 5, 7, 7)), r"attention_mask of shape \(2, 5, 7, 7\)"),
    (lambda ids: dict(input_ids=ids.float()), r"input_ids must be an int32 or int64 tensor, got torch.float32"),
    (lambda ids: dict(input_ids=ids.tolist()), r"input_ids must be an int32 or int64 tensor, got list"),
    (lambda ids: dict(input_ids=ids[0]), r"input_ids must be \(batch, seq_len\), got shape \(7,\)"),
    (lambda ids: dict(input_ids=ids, token_type_ids=torch.zeros(2, 7)), r"token_type_ids must be an int32 or int64 tensor"),
    (lambda ids: dict(input_ids=ids, token_type_ids=torch.zeros(2, 6, dtype=torch.long)), r"token_type_ids must be \(batch, seq_len\)"),
    (lambda ids: dict(input_ids=ids, position_ids=torch.zeros(3, 7, dtype=torch.long)), r"position_ids must be \(batch, seq_len\)"),
    (lambda ids: dict(input_ids=ids, inputs_embeds=torch.randn(2, 7, 32)), r"exactly one of input_ids or inputs_embeds \(both were given\)"),
    (lambda ids: dict(), r"exactly one of input_ids or inputs_embeds \(neither was given\)"),
    (lambda ids: dict(inputs_embeds=torch.randn(2, 7, 31)), r"inputs_embeds must be \(batch, seq_len, 32\)"),
    (lambda ids: dict(inputs_embeds=torch.ones(2, 7, 32, dtype=torch.long)), r"inputs_embeds must be a floating-point tensor"),
    (lambda ids: dict(input_ids=ids, head_mask=torch.ones(2, 4)), r"does not support head_mask"),
    (lambda ids: dict(input_ids=ids, encoder_hidden_states=torch.randn(2, 7, 32)), r"does not support encoder_hidden_states"),
    (lambda ids: dict(input_ids=ids[:, :0]), r"the input has no tokens \(shape \(2, 0\)\)"),
    (lambda ids: dict(input_ids=ids, attention_mask=torch.ones(2, 7, dtype=torch.complex64)),
     r"attention_mask must be bool, integer or floating point, got torch.complex64"),
    (lambda ids: dict(inputs_embeds=torch.randn(2, 7, 32, dtype=torch.float64)),
     r"inputs_embeds are torch.float64 but the model is torch.float32"),
], ids=["id>=vocab", "id<0", "type>=types", "position>=max", "too-long", "mask-len", "mask-batch", "mask-heads",
        "float-ids", "list-ids", "1d-ids", "float-types", "types-shape", "positions-batch", "both", "neither",
        "embeds-width", "embeds-dtype", "head_mask", "decoder", "no-tokens", "embeds-wider", "complex-mask"])
def test_bad_input_raises_a_clear_value_error(model, bad, match):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=match):
        model(**bad(_ids()))


def test_inputs_embeds_path_checks_token_types_and_positions(model):
    with pytest.raises(ValueError, match="token_type_ids contains 5"):
        model(inputs_embeds=torch.randn(2, 7, 32), token_type_ids=torch.full((2, 7), 5))
    with pytest.raises(ValueError, match="position_ids contains 30"):
        model(inputs_embeds=torch.randn(2, 7, 32), position_ids=torch.full((2, 7), 30))


def test_unknown_keyword_is_a_type_error_and_harmless_ones_pass(model):
    ids = _ids()
    with pytest.raises(TypeError, match="unexpected keyword argument 'attenton_mask'"):
        model(ids, attenton_mask=torch.ones_like(ids))
    ref = model(ids).last_hidden_state
    out = model(ids, use_cache=False, num_items_in_batch=3, encoder_hidden_states=None, past_key_values=None)
    assert torch.equal(out.last_hidden_state, ref)


def test_heads_check_inputs_too():
    head = fastbert.BertForTokenClassification(fastbert.BertConfig(**CFG)).eval()
    with pytest.raises(ValueError, match="input_ids contains 200"):
        head(torch.full((1, 4), 200))
    ids = _ids()
    with pytest.raises(ValueError, match="labels must be integer class ids, got torch.float32"):
        head(ids, labels=torch.zeros(2, 7))
    with pytest.raises(ValueError, match=r"labels of shape \(7, 2\) do not fit logits of shape \(2, 7, 2\)"):
        head(ids, labels=torch.zeros(7, 2, dtype=torch.long))  # transposed: would pair labels with other tokens
    assert head(ids, labels=torch.zeros(14, dtype=torch.long)).loss is not None  # flat, as HF takes them
    choice = fastbert.BertForMultipleChoice(fastbert.BertConfig(**CFG)).eval()
    for shape in ((2, 7), (1, 2, 3, 7)):
        with pytest.raises(ValueError, match=r"input_ids must be \(batch, num_choices, seq_len\)"):
            choice(torch.randint(1, 97, shape))


def test_narrower_embeddings_and_long_sequences_with_own_positions():
    """bf16 inputs_embeds into an fp32 model are widened exactly (HF's sum promotes them);
    a sequence longer than max_position_embeddings runs with its own position ids, its token
    types zeros past the model's buffer, as in HF."""
    from hf_bert import check, twins
    hf, fb = twins("BertModel", **CFG)
    hf.eval(), fb.eval()
    embeds = torch.randn(2, 7, 32).bfloat16()
    check("bf16 embeds", fb(inputs_embeds=embeds).last_hidden_state, hf(inputs_embeds=embeds).last_hidden_state)
    ids, positions = _ids(1, 30), (torch.arange(30) % 24)[None]
    check("30 tokens, own positions", fb(ids, position_ids=positions).last_hidden_state,
          hf(ids, position_ids=positions).last_hidden_state)


@pytest.mark.gpu
def test_wrong_device(model):
    """Needs a second device (skipped on CPU-only machines)."""
    ids = _ids()
    with pytest.raises(ValueError, match="the inputs are on cuda:0 but the model is on cpu"):
        model(ids.cuda())
    with pytest.raises(ValueError, match="attention_mask is on cuda:0 but the model is on cpu"):
        model(ids, attention_mask=torch.ones_like(ids).cuda())
    with pytest.raises(ValueError, match="token_type_ids is on cuda:0"):
        model(ids, token_type_ids=torch.zeros_like(ids).cuda())


@pytest.mark.parametrize("mask", [None, "2d"])
def test_empty_batch(model, mask):
    ids = torch.zeros(0, 7, dtype=torch.long)
    kw = {} if mask is None else {"attention_mask": torch.zeros(0, 7, dtype=torch.long)}
    out = model(ids, output_hidden_states=True, **kw)
    assert out.last_hidden_state.shape == (0, 7, 32) and out.pooler_output.shape == (0, 32)
    assert all(h.shape == (0, 7, 32) for h in out.hidden_states)
    att = model(ids, output_attentions=True, **kw).attentions
    assert all(a.shape == (0, 4, 7, 7) for a in att)
    head = fastbert.BertForSequenceClassification(fastbert.BertConfig(**CFG, num_labels=3)).eval()
    logits = head(ids, **kw).logits
    assert logits.shape == (0, 3)
    mlm = fastbert.BertForMaskedLM(fastbert.BertConfig(**CFG))
    out = mlm(ids, labels=torch.zeros(0, 7, dtype=torch.long), **kw)
    assert out.logits.shape == (0, 7, 97)
