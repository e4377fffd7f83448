"""fastbert's model and heads against transformers' BERT (random weights, fp32, CPU).

Every class, three configs, four padding patterns, both encoder paths (unpadded, the
default, and padded): hidden states of every layer, pooler, logits, losses, attention
probabilities and the gradient of every parameter agree within 1e-5 wherever they are
defined (real token positions; sequences with at least one real token). Losses use -100 or
out-of-range positions so that padding does not enter them, except question answering's,
which HF normalises over every position (test_losses_that_read_padding covers the rest).
"""

import functools
from unittest.mock import patch

import pytest
import torch

import fastbert.modeling

from hf_bert import CONFIGS, PADDINGS, SEQ, check, config_kwargs, dump_report, inputs, twins


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    dump_report()


def _row_labels(g, rows, lengths, n):
    """Class ids in [0, n), -100 for sequences without real tokens (CE ignores them)."""
    y = torch.randint(0, n, (rows,), generator=g)
    return y.masked_fill(torch.tensor(lengths) == 0, -100)


def _token_labels(g, mask, n):
    y = torch.randint(0, n, mask.shape, generator=g)
    y = y.masked_fill(torch.rand(mask.shape, generator=g) < 0.3, -100)  # some real tokens unlabelled too
    return y.masked_fill(mask == 0, -100)


def _labels(head, g, lengths, mask, cfg, unpad):
    """(label kwargs, whether the loss is defined, i.e. padding cannot enter it)."""
    rows, empty = len(lengths), 0 in lengths
    vocab, n = cfg["vocab_size"], cfg.get("num_labels", 2)
    if head in ("BertModel", "BertModel-nopool"):
        return {}, False
    if head == "BertForPreTraining":
        return dict(labels=_token_labels(g, mask, vocab), next_sentence_label=_row_labels(g, rows, lengths, 2)), True
    if head == "BertForMaskedLM":
        return dict(labels=_token_labels(g, mask, vocab)), True
    if head in ("BertForNextSentencePrediction", "SeqCls-single"):
        return dict(labels=_row_labels(g, rows, lengths, n)), True
    if head == "SeqCls-regression":
        return dict(labels=torch.randn(rows, generator=g)), not empty
    if head == "SeqCls-multi":
        return dict(labels=(torch.rand(rows, n, generator=g) < 0.5).float()), not empty
    if head == "SeqCls-explicit":  # problem_type="regression" with two outputs
        return dict(labels=torch.randn(rows, n, generator=g)), not empty
    if head == "BertForTokenClassification":
        return dict(labels=_token_labels(g, mask, n)), True
    if head == "BertForQuestionAnswering":
        lens = torch.tensor(lengths)
        start = (torch.rand(rows, generator=g) * lens).long()
        end = torch.minimum(start + 2, (lens - 1).clamp(min=0))
        start, end = start.masked_fill(lens == 0, SEQ + 3), end.masked_fill(lens == 0, SEQ + 3)  # clamped, ignored
        # HF's loss normalises over every position, padding included: given positions, the
        # head runs its encoder padded.
        return dict(start_positions=start, end_positions=end), True
    if head == "BertForMultipleChoice":
        y = torch.randint(0, 2, (rows // 2,), generator=g)
        return dict(labels=y.masked_fill(torch.tensor(lengths).view(-1, 2).eq(0).any(1), -100)), True
    raise AssertionError(head)


# head -> (class, extra config, [(output field, "token" | "row")])
HEADS = {
    "BertModel": ("BertModel", {}, [("last_hidden_state", "token"), ("pooler_output", "row")]),
    "BertModel-nopool": ("BertModel", {}, [("last_hidden_state", "token")]),
    "BertForPreTraining": ("BertForPreTraining", {}, [("prediction_logits", "token"), ("seq_relationship_logits", "row")]),
    "BertForMaskedLM": ("BertForMaskedLM", {}, [("logits", "token")]),
    "BertForNextSentencePrediction": ("BertForNextSentencePrediction", {}, [("logits", "row")]),
    "SeqCls-regression": ("BertForSequenceClassification", dict(num_labels=1), [("logits", "row")]),
    "SeqCls-single": ("BertForSequenceClassification", dict(num_labels=3), [("logits", "row")]),
    "SeqCls-multi": ("BertForSequenceClassification", dict(num_labels=3), [("logits", "row")]),
    "SeqCls-explicit": ("BertForSequenceClassification", dict(num_labels=2, problem_type="regression"),
                        [("logits", "row")]),
    "BertForTokenClassification": ("BertForTokenClassification", dict(num_labels=5), [("logits", "token")]),
    "BertForQuestionAnswering": ("BertForQuestionAnswering", {}, [("start_logits", "token"), ("end_logits", "token")]),
    "BertForMultipleChoice": ("BertForMultipleChoice", {}, [("logits", "row")]),
}


def _surrogate(out, fields, mask, rows_ok):
    """A loss over the defined outputs only, with fixed random weights."""
    g = torch.Generator().manual_seed(5)
    total = 0.0
    for field, kind in fields:
        t = out[field]
        t = t[mask.bool()] if kind == "token" else t.reshape(rows_ok.numel(), -1)[rows_ok]
        total = total + (t * torch.randn(t.shape, generator=g)).mean()  # a mean, like the losses: O(1) gradients
    return total


@functools.lru_cache(maxsize=None)
def _cached_twins(head, config):
    cls, extra, _ = HEADS[head]
    pool = {"add_pooling_layer": False} if head == "BertModel-nopool" else {}
    return twins(cls, **config_kwargs(config, **extra), **pool)


# Every head, config and padding on the default (unpadded) path; the padded path (taken under
# torch.compile and CUDA graphs) on the first config.
CASES = [(h, c, p, True) for h in HEADS for c in CONFIGS for p in PADDINGS] + \
        [(h, next(iter(CONFIGS)), p, False) for h in HEADS for p in PADDINGS]


@pytest.mark.parametrize("head,config,padding,unpad", CASES,
                         ids=[f"{h}-{c}-{p}-{'unpadded' if u else 'padded'}" for h, c, p, u in CASES])
def test_parity_with_transformers(head, config, padding, unpad):
    cls, extra, fields = HEADS[head]
    cfg = config_kwargs(config, **extra)
    hf, fb = _cached_twins(head, config)
    hf.eval(), fb.eval()
    hf.zero_grad(set_to_none=True), fb.zero_grad(set_to_none=True)
    (fb if cls == "BertModel" else fb.bert).unpad = unpad
    lengths = PADDINGS[padding]
    ids, tt, mask = inputs(lengths, cfg["vocab_size"], cfg.get("type_vocab_size", 2))
    labels, loss_defined = _labels(head, torch.Generator().manual_seed(2), lengths, mask, cfg, unpad)
    if cls == "BertForMultipleChoice":  # four sequences as two questions with two choices each
        ids, tt, mask = ids.view(2, 2, SEQ), tt.view(2, 2, SEQ), mask.view(2, 2, SEQ)
    flat_mask = mask.reshape(-1, SEQ).bool()
    rows_ok = flat_mask.any(1)
    tag = f"[{head},{config},{padding},{'unpadded' if unpad else 'padded'}]"

    out_h = hf(input_ids=ids, token_type_ids=tt, attention_mask=mask, output_hidden_states=True, **labels)
    out_f = fb(input_ids=ids, token_type_ids=tt, attention_mask=mask, output_hidden_states=True, **labels)
    assert type(out_f).__name__ == type(out_h).__name__
    for field, kind in fields:
        a, b = out_f[field], out_h[field]
        if kind == "token":
            check(f"{field}{tag}", a[mask.bool()], b[mask.bool()])
        else:
            check(f"{field}{tag}", a.reshape(rows_ok.numel(), -1)[rows_ok], b.reshape(rows_ok.numel(), -1)[rows_ok])
    assert len(out_f.hidden_states) == len(out_h.hidden_states) == cfg["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(out_f.hidden_states, out_h.hidden_states)):
        check(f"hidden_states{tag}[{i}]", a[flat_mask], b[flat_mask])
    if unpad and head != "BertForQuestionAnswering":  # the documented difference: zeros at padded positions
        assert out_f.hidden_states[-1][~flat_mask].abs().max() == 0 if (~flat_mask).any() else True

    if labels:
        assert (out_f.loss is None) == (out_h.loss is None)
    if loss_defined:
        check(f"loss{tag}", out_f.loss, out_h.loss)
        loss_f, loss_h = out_f.loss, out_h.loss
    else:
        loss_f, loss_h = (_surrogate(o, fields, flat_mask, rows_ok) for o in (out_f, out_h))
    loss_f.backward()
    loss_h.backward()
    grads_h = {n: p.grad for n, p in hf.named_parameters(remove_duplicate=False)}
    grads_f = {n: p.grad for n, p in fb.named_parameters(remove_duplicate=False)}
    assert grads_f.keys() == grads_h.keys()
    assert any(g is not None and g.abs().max() > 0 for g in grads_f.values())
    for name, gh in grads_h.items():
        gf = grads_f[name]
        param = dict(fb.named_parameters(remove_duplicate=False))[name]
        gh = torch.zeros_like(param) if gh is None else gh
        gf = torch.zeros_like(param) if gf is None else gf
        check(f"grad{tag}:{name}", gf, gh)

    if unpad:  # the unfused path, which also returns the attention probabilities
        with torch.no_grad():
            att_h = hf(input_ids=ids, token_type_ids=tt, attention_mask=mask, output_attentions=True,
                       output_hidden_states=True)
            att_f = fb(input_ids=ids, token_type_ids=tt, attention_mask=mask, output_attentions=True,
                       output_hidden_states=True)
        assert len(att_f.attentions) == len(att_h.attentions) == cfg["num_hidden_layers"]
        for i, (a, b) in enumerate(zip(att_f.attentions, att_h.attentions)):
            assert a.shape == b.shape
            # rows of real queries: (rows, heads, q, k) -> (real queries, heads, k)
            check(f"attentions{tag}[{i}]", a.transpose(1, 2)[flat_mask], b.transpose(1, 2)[flat_mask])
            assert torch.isfinite(a).all()
        for i, (a, b) in enumerate(zip(att_f.hidden_states, att_h.hidden_states)):
            check(f"hidden_states_unfused{tag}[{i}]", a[flat_mask], b[flat_mask])



@pytest.mark.parametrize("head", ["BertForMaskedLM", "BertForTokenClassification", "BertForPreTraining"])
def test_losses_that_read_padding(head):
    """Labels other than -100 at padded positions (``labels=input_ids`` for MLM) enter HF's
    loss with the hidden states HF computes there: the head then runs its encoder padded and
    the loss and every gradient match; with -100 at padding it stays unpadded."""
    cfg = config_kwargs("h32-4h-2l-relu", num_labels=5)
    hf, fb = twins(head, **cfg)
    hf.eval(), fb.eval()
    ids, tt, mask = inputs(PADDINGS["mixed"], cfg["vocab_size"])
    n = 5 if head == "BertForTokenClassification" else cfg["vocab_size"]
    labels = ids % n
    extra = dict(next_sentence_label=torch.tensor([0, 1, 1, 0])) if head == "BertForPreTraining" else {}
    for at_padding in (True, False):
        hf.zero_grad(set_to_none=True), fb.zero_grad(set_to_none=True)
        y = labels if at_padding else labels.masked_fill(mask == 0, -100)
        out_h = hf(ids, attention_mask=mask, token_type_ids=tt, labels=y, output_hidden_states=True, **extra)
        out_f = fb(ids, attention_mask=mask, token_type_ids=tt, labels=y, output_hidden_states=True, **extra)
        check(f"loss[{head},{at_padding}]", out_f.loss, out_h.loss)
        out_f.loss.backward(), out_h.loss.backward()
        grads_h = dict(hf.named_parameters())
        for name, p in fb.named_parameters():
            check(f"grad[{head},{at_padding}]:{name}", p.grad, grads_h[name].grad)
        at_pads = out_f.hidden_states[-1][mask == 0]
        assert (at_pads.abs().max() > 0) == at_padding  # padded (HF's values) or unpadded (zeros)

# -- training mode ------------------------------------------------------------------------

@pytest.mark.parametrize("cls", ["BertForSequenceClassification", "BertForMaskedLM", "BertForTokenClassification"])
def test_train_mode_without_dropout_matches_transformers(cls):
    hf, fb = twins(cls, dropout=0.0, **config_kwargs("h32-4h-2l-relu", num_labels=3))
    hf.train(), fb.train()
    ids, tt, mask = inputs(PADDINGS["mixed"])
    for field in ("logits",):
        check(f"train_nodropout:{cls}", fb(ids, attention_mask=mask, token_type_ids=tt)[field][mask.bool()]
              if cls != "BertForSequenceClassification" else fb(ids, attention_mask=mask, token_type_ids=tt)[field],
              hf(ids, attention_mask=mask, token_type_ids=tt)[field][mask.bool()]
              if cls != "BertForSequenceClassification" else hf(ids, attention_mask=mask, token_type_ids=tt)[field])


@pytest.mark.parametrize("unpad", [True, False])
def test_train_mode_applies_dropout(unpad):
    _, fb = twins("BertForSequenceClassification", dropout=0.2, **config_kwargs("h32-4h-2l-relu"))
    fb.bert.unpad = unpad
    ids, tt, mask = inputs(PADDINGS["mixed"])
    fb.train()
    a = fb(ids, attention_mask=mask, output_hidden_states=True)
    b = fb(ids, attention_mask=mask, output_hidden_states=True)
    assert (a.logits - b.logits).abs().max() > 1e-4
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states)):  # embeddings and every layer
        assert (x - y)[mask.bool()].abs().max() > 1e-4, f"hidden_states[{i}] not dropped out"
    with torch.no_grad():  # attention dropout alone changes the probabilities
        p1, p2 = (fb(ids, attention_mask=mask, output_attentions=True).attentions[0] for _ in range(2))
    assert (p1 - p2).abs().max() > 1e-4
    fb.eval()
    c, d = fb(ids, attention_mask=mask), fb(ids, attention_mask=mask)
    assert torch.equal(c.logits, d.logits)


# -- input variants ---------------------------------------------------------------------------

def _model_pair():
    hf, fb = twins("BertModel", **config_kwargs("h96-6h-3l-gelu_new", type_vocab_size=3))
    return hf.eval(), fb.eval()


def test_default_token_types_and_positions():
    hf, fb = _model_pair()
    ids, _, mask = inputs(PADDINGS["mixed"])
    m = mask.bool()
    check("defaults", fb(ids, attention_mask=mask).last_hidden_state[m], hf(ids, attention_mask=mask).last_hidden_state[m])
    check("no mask", fb(ids).last_hidden_state, hf(ids).last_hidden_state)


def test_explicit_position_and_token_type_ids():
    hf, fb = _model_pair()
    ids, tt, mask = inputs(PADDINGS["len1"], types=3)
    m = mask.bool()
    pos = torch.randint(0, 24, ids.shape)
    for p in (pos, pos[:1], pos[0]):  # (B, S), (1, S) broadcast, (S,) broadcast
        check("position_ids", fb(ids, attention_mask=mask, token_type_ids=tt, position_ids=p).last_hidden_state[m],
              hf(ids, attention_mask=mask, token_type_ids=tt, position_ids=p.expand_as(ids)).last_hidden_state[m])
    check("token_type_ids (1,S)", fb(ids, token_type_ids=tt[:1]).last_hidden_state,
          hf(ids, token_type_ids=tt[:1].expand_as(ids)).last_hidden_state)


def test_int32_ids():
    hf, fb = _model_pair()
    ids, tt, mask = inputs(PADDINGS["mixed"], types=3)
    m = mask.bool()
    out = fb(ids.int(), attention_mask=mask.int(), token_type_ids=tt.int(), position_ids=torch.arange(SEQ).int()[None])
    check("int32", out.last_hidden_state[m], hf(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state[m])
    bool_mask = fb(ids, attention_mask=mask.bool()).last_hidden_state
    check("bool mask", bool_mask[m], hf(ids, attention_mask=mask).last_hidden_state[m])


@pytest.mark.parametrize("padding", ["none", "mixed"])
def test_inputs_embeds(padding):
    hf, fb = _model_pair()
    ids, tt, mask = inputs(PADDINGS[padding], types=3)
    m = mask.bool()
    emb = torch.randn(4, SEQ, 96, requires_grad=True)
    emb_h = emb.detach().clone().requires_grad_(True)
    a = fb(inputs_embeds=emb, attention_mask=mask, token_type_ids=tt)
    b = hf(inputs_embeds=emb_h, attention_mask=mask, token_type_ids=tt)
    check("inputs_embeds", a.last_hidden_state[m], b.last_hidden_state[m])
    check("inputs_embeds pooler", a.pooler_output, b.pooler_output)
    a.last_hidden_state[m].sum().backward()
    b.last_hidden_state[m].sum().backward()
    check("inputs_embeds grad", emb.grad, emb_h.grad)
    # the word embeddings of the ids give back the ids' result
    words = fb.embeddings.word_embeddings(ids)
    check("inputs_embeds = ids", fb(inputs_embeds=words, attention_mask=mask).last_hidden_state[m],
          fb(ids, attention_mask=mask).last_hidden_state[m])


def test_multiple_choice_with_inputs_embeds():
    hf, fb = twins("BertForMultipleChoice", **config_kwargs("h32-4h-2l-relu"))
    hf.eval(), fb.eval()
    emb = torch.randn(2, 3, 7, 32)
    check("mc embeds", fb(inputs_embeds=emb).logits, hf(inputs_embeds=emb).logits)


@pytest.mark.parametrize("kind", ["3d-keep", "4d-additive", "4d-bool", "4d-heads"])
def test_3d_and_4d_masks(kind):
    hf, fb = _model_pair()
    ids, tt, mask = inputs(PADDINGS["mixed"], types=3)
    keep = torch.rand(4, SEQ, SEQ) < 0.7
    keep[..., 0] = True  # every query keeps a key
    additive = torch.zeros(4, 1, SEQ, SEQ).masked_fill(~keep[:, None], torch.finfo(torch.float32).min)
    if kind == "3d-keep":
        ours = fb(ids, attention_mask=keep.long()).last_hidden_state
        theirs = hf(ids, attention_mask=additive).last_hidden_state  # HF 5.x takes no 3-D mask
    elif kind == "4d-additive":
        ours, theirs = fb(ids, attention_mask=additive).last_hidden_state, hf(ids, attention_mask=additive).last_hidden_state
    elif kind == "4d-bool":  # 1 = keep, as HF's sdpa path reads boolean masks
        ours, theirs = fb(ids, attention_mask=keep[:, None]).last_hidden_state, hf(ids, attention_mask=additive).last_hidden_state
    else:
        per_head = additive.expand(4, 6, SEQ, SEQ).clone()
        per_head[:, 3, :, 1] = torch.finfo(torch.float32).min
        ours, theirs = fb(ids, attention_mask=per_head).last_hidden_state, hf(ids, attention_mask=per_head).last_hidden_state
    check(f"mask {kind}", ours, theirs)


@pytest.mark.parametrize("layout", ["left", "scattered", "right"])
def test_masks_that_are_not_prefixes(layout):
    """Left padding (HF's padding_side="left") and scattered masks: real positions and the
    pooled output match HF. A left-padded row's pooler reads a padded position 0, which HF
    computes, so such batches run padded; the others still run unpadded."""
    hf, fb = twins("BertForSequenceClassification", **config_kwargs("h32-4h-2l-relu", num_labels=3))
    hf.eval(), fb.eval()
    ids, tt, mask = inputs(PADDINGS["mixed"], types=3)
    if layout == "left":
        ids, tt, mask = ids.flip(1), tt.flip(1), mask.flip(1)
    elif layout == "scattered":
        mask[:, 0] = 1  # [CLS] real, holes after it
        mask[1, 2] = mask[3, 5] = 0
    gathers = []
    real = fastbert.modeling.gather_tokens
    with patch.object(fastbert.modeling, "gather_tokens", lambda *a: gathers.append(1) or real(*a)):
        ours = fb(ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
    theirs = hf(ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
    assert bool(gathers) == (layout != "left")
    m = mask.bool()
    check(f"mask {layout}: hidden", ours.hidden_states[-1][m], theirs.hidden_states[-1][m])
    check(f"mask {layout}: logits", ours.logits, theirs.logits)


def test_untied_word_embeddings_match_transformers():
    hf, fb = twins("BertForMaskedLM", **config_kwargs("h32-4h-2l-relu", tie_word_embeddings=False))
    assert hf.cls.predictions.decoder.weight is not hf.bert.embeddings.word_embeddings.weight
    assert fb.cls.predictions.decoder.weight is not fb.bert.embeddings.word_embeddings.weight
    hf.eval(), fb.eval()
    ids, tt, mask = inputs(PADDINGS["mixed"])
    m = mask.bool()
    labels = ids.masked_fill(~m, -100)
    a, b = fb(ids, attention_mask=mask, labels=labels), hf(ids, attention_mask=mask, labels=labels)
    check("untied logits", a.logits[m], b.logits[m])
    check("untied loss", a.loss, b.loss)
    a.loss.backward(), b.loss.backward()
    check("untied decoder grad", fb.cls.predictions.decoder.weight.grad, hf.cls.predictions.decoder.weight.grad)
    check("untied word grad", fb.bert.embeddings.word_embeddings.weight.grad, hf.bert.embeddings.word_embeddings.weight.grad)


def test_inference_mode_matches_no_grad():
    """sentence-transformers and pipelines run under torch.inference_mode, whose tensors
    carry no version counter."""
    hf, fb = _model_pair()
    ids, tt, mask = inputs(PADDINGS["mixed"], types=3)
    with torch.no_grad():
        ref = fb(ids, attention_mask=mask).last_hidden_state
    with torch.inference_mode():
        for _ in range(2):
            out = fb(ids, attention_mask=mask).last_hidden_state
            assert torch.equal(out, ref)


def test_weights_written_through_data_take_effect():
    """Writes that autograd's version counters do not see (``p.data`` changed in place, as
    peft's merge and EMA code do) reach the next forward: no eager call reuses anything
    computed from the weights (a fused QKV weight cached on the versions went stale here)."""
    hf, fb = _model_pair()
    ids, tt, mask = inputs(PADDINGS["mixed"], types=3)
    real = mask.bool()
    with torch.no_grad():
        before = fb(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
        for model in (hf, fb):
            attention = model.encoder.layer[1].attention.self
            for linear in (attention.query, attention.key, attention.value):
                linear.weight.data.mul_(1.5)
                linear.bias.data.add_(0.1)
        after = fb(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
        theirs = hf(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
    assert (after - before)[real].abs().max() > 1e-3
    check("written through .data", after[real], theirs[real])
