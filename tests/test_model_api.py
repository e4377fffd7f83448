"""fastbert models' Hugging Face API beyond forward parity (test_modeling.py): outputs that
index like HF's, config switches, parameter counts, embedding accessors, and activation
checkpointing with HF's options, each against transformers where it has the same API."""

import pytest
import torch

from hf_bert import PADDINGS, check, config_kwargs, inputs, twins


@pytest.mark.parametrize("how,kwargs,recomputed", [
    ("gradient", dict(gradient_checkpointing_kwargs={"use_reentrant": False}), 3),
    ("activation", dict(every_n_layers=2), 2),  # layers 0 and 2 of 3
    ("activation", dict(offload=True, activation_checkpointing_kwargs={"preserve_rng_state": False}), 3),
], ids=["gradient", "every-2", "offload"])
def test_checkpointing_gives_the_same_gradients(how, kwargs, recomputed, monkeypatch):
    hf, fb = twins("BertForMaskedLM", **config_kwargs("h96-6h-3l-gelu_new"))
    ids, tt, mask = inputs(PADDINGS["mixed"])
    labels = ids.masked_fill(mask == 0, -100)
    fb.train()
    fb(ids, attention_mask=mask, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in fb.named_parameters()}
    fb.zero_grad()
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(k) or checkpoint(*a, **k))
    getattr(fb, f"{how}_checkpointing_enable")(**kwargs)
    assert fb.is_gradient_checkpointing and fb.is_activation_checkpointing
    fb(ids, attention_mask=mask, labels=labels).loss.backward()
    assert len(calls) == recomputed and all(k["use_reentrant"] is False for k in calls)
    for n, p in fb.named_parameters():
        check(f"grad_checkpointing:{n}", p.grad, plain[n])
    getattr(fb, f"{how}_checkpointing_disable")()
    assert not fb.is_gradient_checkpointing
    with pytest.raises(ValueError, match="every_n_layers must be a positive int"):
        fb.activation_checkpointing_enable(every_n_layers=0)


def test_outputs_index_like_transformers():
    hf, fb = twins("BertForPreTraining", **config_kwargs("h32-4h-2l-relu"))
    hf.eval(), fb.eval()
    ids, tt, mask = inputs(PADDINGS["none"])
    h = hf(ids, attention_mask=mask, output_hidden_states=True)
    f = fb(ids, attention_mask=mask, output_hidden_states=True)
    assert list(f.keys()) == [k for k in h.keys() if h[k] is not None]
    check("index", f[0], h[0])
    check("index", f[1], h[1])
    check("index", f["seq_relationship_logits"], h["seq_relationship_logits"])
    check("index", f.to_tuple()[2][-1], h.to_tuple()[2][-1])
    assert len(f[:2]) == 2 and f[:2][1] is f.seq_relationship_logits
    assert "loss" not in f and "prediction_logits" in f
    with pytest.raises(KeyError):
        f["loss"]
    t_f = fb(ids, attention_mask=mask, return_dict=False)
    t_h = hf(ids, attention_mask=mask, return_dict=False)
    assert isinstance(t_f, tuple) and len(t_f) == len(t_h) == 2
    check("tuple", t_f[0], t_h[0])
    base = fb.bert(ids, attention_mask=mask, return_dict=False)
    assert isinstance(base, tuple) and len(base) == 2  # last_hidden_state, pooler_output
    seq, pooled = fb.bert(ids, attention_mask=mask)[:2]
    check("bert[:2]", pooled, hf.bert(ids, attention_mask=mask)[1])
    for out in (f, h):  # keys set by item: a field, then a new key after the fields
        out["seq_relationship_logits"] = out["seq_relationship_logits"] * 2
        out["input_ids"] = ids
    assert list(f.keys()) == list(h.keys()) and f[-1] is ids and f.input_ids is ids
    check("setitem", f.seq_relationship_logits, h.seq_relationship_logits)
    leaves, spec = torch.utils._pytree.tree_flatten(f)
    again = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert again.keys() == f.keys() and again["input_ids"] is ids
    for attentions in (False, True):  # BertModel's fields: transformers 5 adds empty cross_attentions
        for hidden in (False, True):
            kw = dict(attention_mask=mask, output_attentions=attentions, output_hidden_states=hidden)
            ours, theirs = fb.bert(ids, **kw), hf.bert(ids, **kw)
            assert type(ours).__name__ == type(theirs).__name__ and list(ours.keys()) == list(theirs.keys())
            assert len(fb.bert(ids, return_dict=False, **kw)) == len(hf.bert(ids, return_dict=False, **kw))
            assert ours.cache is None and ours.cross_attentions == theirs.cross_attentions


def test_config_switches_outputs():
    _, fb = twins("BertModel", **config_kwargs("h32-4h-2l-relu"))
    ids, tt, mask = inputs(PADDINGS["mixed"])
    fb.config.output_hidden_states = True
    assert len(fb(ids, attention_mask=mask).hidden_states) == 3
    fb.config.return_dict = False
    assert isinstance(fb(ids, attention_mask=mask), tuple)


def test_num_parameters_counts_as_transformers():
    hf, fb = twins("BertForMaskedLM", **config_kwargs("h32-4h-2l-relu"))
    for kw in ({}, {"exclude_embeddings": True}, {"only_trainable": True}):
        assert fb.num_parameters(**kw) == hf.num_parameters(**kw), kw
    fb.bert.embeddings.requires_grad_(False)
    hf.bert.embeddings.requires_grad_(False)
    assert fb.num_parameters(only_trainable=True) == hf.num_parameters(only_trainable=True) < fb.num_parameters()


def test_input_and_output_embeddings_accessors():
    hf, fb = twins("BertForMaskedLM", **config_kwargs("h32-4h-2l-relu"))
    assert fb.bert.get_input_embeddings() is fb.bert.embeddings.word_embeddings
    assert fb.get_output_embeddings() is fb.cls.predictions.decoder
    assert fb.cls.predictions.decoder.weight is fb.bert.embeddings.word_embeddings.weight
    assert fb.cls.predictions.decoder.bias is fb.cls.predictions.bias
    new = torch.nn.Embedding(97, 32, padding_idx=0)
    fb.bert.set_input_embeddings(new)
    assert fb.bert.embeddings.word_embeddings is new


def test_autocast_keeps_hf_dtypes_and_accuracy():
    """Under bf16 autocast HF's residual stream stays fp32 (the GEMMs run in bf16, the
    LayerNorms in fp32), and so does fastbert's: the same output dtype, and an error against
    the fp32 forward no larger than HF's own (a bf16 stream was ~7x HF's)."""
    hf, fb = twins("BertModel", **config_kwargs("h32-4h-2l-relu"))
    hf.eval(), fb.eval()
    ids, tt, mask = inputs(PADDINGS["mixed"])
    real = mask.bool()
    with torch.no_grad():
        exact = hf(ids, attention_mask=mask).last_hidden_state[real]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours, theirs = (m(ids, attention_mask=mask).last_hidden_state for m in (fb, hf))
    assert ours.dtype == theirs.dtype == torch.float32
    ours_err, theirs_err = ((o[real] - exact).abs().max().item() for o in (ours, theirs))
    assert ours_err <= 1.5 * theirs_err, (ours_err, theirs_err)
