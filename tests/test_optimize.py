"""fastbert.optimize on live transformers models: same outputs and losses, parameters shared
(not copied), gradients reaching them, train/eval mode kept, clear errors."""

import pytest
import torch

import fastbert
from hf_bert import PADDINGS, check, config_kwargs, inputs, transformers

CFG = config_kwargs("h96-6h-3l-gelu_new")


def _hf(cls, **extra):
    torch.manual_seed(0)
    model = getattr(transformers, cls)(transformers.BertConfig(**{**CFG, **extra}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _ptrs(module):
    return {n: p.data_ptr() for n, p in module.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("cls", ["BertForSequenceClassification", "BertForPreTraining"])
def test_optimized_head_gives_the_same_logits_loss_and_gradients(cls):
    model = _hf(cls, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).eval()
    ids, tt, mask = inputs(PADDINGS["mixed"])
    m = mask.bool()
    if cls == "BertForSequenceClassification":
        labels = dict(labels=torch.tensor([0, 1, 1, 0]))
    else:
        labels = dict(labels=ids.masked_fill(~m, -100), next_sentence_label=torch.tensor([0, 1, 0, 1]))
    before = model(ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True, **labels)
    before.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ptrs, keys = _ptrs(model), list(model.state_dict())

    assert fastbert.optimize(model) is model
    assert isinstance(model.bert, fastbert.BertModel)
    assert _ptrs(model) == ptrs and list(model.state_dict()) == keys  # shared, not copied; same names
    assert model.bert.embeddings.word_embeddings is model.get_input_embeddings()
    assert not model.bert.training
    after = model(ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True, **labels)
    logits = "logits" if cls == "BertForSequenceClassification" else "prediction_logits"
    a, b = after[logits], before[logits]
    check(f"optimize:{cls}:logits", a[m] if a.dim() == 3 else a, b[m] if b.dim() == 3 else b)
    check(f"optimize:{cls}:loss", after.loss, before.loss)
    for x, y in zip(after.hidden_states, before.hidden_states):
        check(f"optimize:{cls}:hidden", x[m], y[m])
    after.loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        check(f"optimize:{cls}:grad", p.grad, grads[n])
    t = model(ids, attention_mask=mask, return_dict=False)
    assert isinstance(t, tuple)


def test_optimizer_steps_reach_the_shared_parameters():
    model = _hf("BertForSequenceClassification").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # made before optimize: holds HF's parameters
    fastbert.optimize(model)
    assert model.bert.training and model.bert.encoder.layer[0].attention.self.dropout.p == 0.1
    ids, tt, mask = inputs(PADDINGS["mixed"])
    query = model.bert.encoder.layer[0].attention.self.query.weight
    before = query.detach().clone()
    model(ids, attention_mask=mask, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
    opt.step()
    assert (query - before).abs().max() > 0


def test_top_level_bert_model_returns_a_sharing_fastbert_model():
    hf = _hf("BertModel").eval()
    ids, tt, mask = inputs(PADDINGS["len1"])
    m = mask.bool()
    ref = hf(ids, attention_mask=mask)
    fb = fastbert.optimize(hf)
    assert isinstance(fb, fastbert.BertModel) and fb is not hf
    assert _ptrs(fb) == _ptrs(hf)
    assert fb.embeddings.position_ids is hf.embeddings.position_ids
    out = fb(ids, attention_mask=mask)
    check("optimize:BertModel", out.last_hidden_state[m], ref.last_hidden_state[m])
    check("optimize:BertModel:pooler", out.pooler_output, ref.pooler_output)
    assert fastbert.optimize(fb) is fb
    hf.config.output_hidden_states = True  # the config is shared
    assert fb(ids).hidden_states is not None


def test_nested_and_shared_berts_are_all_swapped():
    class TwoTowers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query_tower = _hf("BertModel")
            self.towers = torch.nn.ModuleList([_hf("BertForMaskedLM"), self.query_tower])

    model = TwoTowers()
    fastbert.optimize(model)
    assert isinstance(model.query_tower, fastbert.BertModel)
    assert model.towers[1] is model.query_tower  # one BERT reachable twice stays one module
    assert isinstance(model.towers[0].bert, fastbert.BertModel)


def test_gradient_checkpointing_carries_over():
    model = _hf("BertForSequenceClassification")
    # transformers' current name where it has one (the older one warns that it will go in v6)
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    fastbert.optimize(model)
    assert model.bert.encoder.gradient_checkpointing


@pytest.mark.parametrize("extra,match", [
    (dict(is_decoder=True), "is_decoder"),
    (dict(is_decoder=True, add_cross_attention=True), "add_cross_attention"),
    (dict(hidden_act="silu"), "hidden_act='silu'"),
])
def test_configs_fastbert_cannot_run_are_refused(extra, match):
    model = _hf("BertForMaskedLM", **extra)
    with pytest.raises(ValueError, match=match):
        fastbert.optimize(model)
    assert not isinstance(model.bert, fastbert.BertModel)  # left untouched


def test_relative_positions_are_refused():
    model = _hf("BertModel")
    model.config.position_embedding_type = "relative_key"
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        fastbert.optimize(model)


def test_replaced_submodules_are_called_and_models_without_bert_refused():
    model = _hf("BertForSequenceClassification").eval()
    layer = model.bert.encoder.layer[0].attention.self

    class Adapter(torch.nn.Linear):  # a wrapper with a forward of its own, which fastbert must call
        def forward(self, x):
            return super().forward(x) * 0.5

    adapter = Adapter(96, 96)
    adapter.load_state_dict(layer.query.state_dict())
    layer.query = adapter
    ids, tt, mask = inputs(PADDINGS["mixed"])
    with torch.no_grad():
        theirs = model(ids, attention_mask=mask).logits
        fastbert.optimize(model)
        ours = model(ids, attention_mask=mask).logits
    assert isinstance(model.bert, fastbert.BertModel) and model.bert.encoder.layer[0].attention.self.query is adapter
    check("optimize:adapter", ours, theirs)
    other = _hf("BertModel")
    other.encoder.layer[1].output.dropout = torch.nn.Identity()
    with pytest.raises(TypeError, match="encoder.layer.1.output.dropout is a Identity, expected an nn.Dropout"):
        fastbert.optimize(other)
    with pytest.raises(ValueError, match="no transformers BertModel inside Linear"):
        fastbert.optimize(torch.nn.Linear(2, 2))
