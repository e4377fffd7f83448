"""Modules that are not plain ``nn.Linear``/``nn.Embedding`` any more: peft's LoRA adapters,
dynamically quantized layers, hooks. fastbert fuses the plain ones (Q, K and V in one GEMM,
biases into the next kernel), reading their weights; every other one is called as a module
(``fastbert.modeling.plain``), so that its extra work is not skipped: the model then agrees
with Hugging Face's with the same replacement, forward and backward.
"""

from __future__ import annotations

import pytest
import torch

from fastbert.modeling import plain
from hf_bert import PADDINGS, check, inputs, twins

peft = pytest.importorskip("peft")
# peft asks the transformers twin whether it checkpoints activations, by the name transformers deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

SMALL = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=48, vocab_size=97,
             max_position_embeddings=24)
TARGETS = ["query", "key", "value", "dense", "word_embeddings", "token_type_embeddings"]


def _lora(model, seed, targets=TARGETS):
    torch.manual_seed(seed)  # init_lora_weights=False: random B too, so the adapters change the output
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("padding", ["mixed", "none"])
def test_lora_matches_hugging_face_with_lora(padding):
    hf, fb = twins("BertForSequenceClassification", num_labels=3, **SMALL)
    hf, fb = _lora(hf.eval(), 0), _lora(fb.eval(), 0)
    fb.load_state_dict(hf.state_dict())
    ids, tt, mask = inputs(PADDINGS[padding])
    labels = torch.tensor([0, 2, 1, 1])
    ours = fb(input_ids=ids, token_type_ids=tt, attention_mask=mask, labels=labels)
    theirs = hf(input_ids=ids, token_type_ids=tt, attention_mask=mask, labels=labels)
    with torch.no_grad():
        base = fb.get_base_model()
        with fb.disable_adapter():
            plain_logits = base(input_ids=ids, token_type_ids=tt, attention_mask=mask).logits
    assert (ours.logits - plain_logits).abs().max() > 1e-3  # the adapters do change the answer
    check("lora logits", ours.logits, theirs.logits)
    ours.loss.backward()
    theirs.loss.backward()
    lora = {n: p for n, p in fb.named_parameters() if "lora_" in n}
    hf_grads = {n: p.grad for n, p in hf.named_parameters() if "lora_" in n}
    assert len(lora) == len(hf_grads) > 0
    for name, p in lora.items():
        assert p.grad is not None, f"{name} got no gradient"
        check(f"lora grad[{name}]", p.grad, hf_grads[name])


def test_merged_adapters_run_the_fused_path_again():
    """peft's merge adds each adapter into its base weight through ``.data``, which autograd's
    version counters do not see: the fused path must read the merged weights."""
    _, fb = twins("BertModel", **SMALL)
    ids, tt, mask = inputs(PADDINGS["mixed"])
    with torch.no_grad():
        fb.eval()(input_ids=ids, token_type_ids=tt, attention_mask=mask)  # the base model served before
    model = _lora(fb, 0)
    with torch.no_grad():
        adapted = model(input_ids=ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
        merged = model.merge_and_unload()
        assert all(plain(m) for m in merged.modules() if isinstance(m, torch.nn.Linear))
        out = merged(input_ids=ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
    check("merged", out, adapted)


def test_hooks_on_fused_modules_run():
    """Forward hooks that change the outputs of fused modules (a projection, a LayerNorm), on both models."""
    hf, fb = twins("BertModel", **SMALL)
    ids, tt, mask = inputs(PADDINGS["mixed"])
    real = mask.bool()
    seen = []

    def hook(module, args, output):
        seen.append(module)
        return output * 0.5

    with torch.no_grad():
        before = fb(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
        for model in (hf, fb):
            for module in (model.encoder.layer[1].attention.self.value, model.encoder.layer[0].output.dense,
                           model.embeddings.LayerNorm, model.encoder.layer[1].attention.output.LayerNorm):
                module.register_forward_hook(hook)
        ours = fb(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
        theirs = hf(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
    assert len(seen) == 8 and (ours - before)[real].abs().max() > 1e-3
    check("hooked", ours[real], theirs[real])


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*quantize:UserWarning")
def test_dynamically_quantized_linears():
    """torch.ao's dynamic int8 quantization swaps every nn.Linear for a quantized module. Each
    quantizes its input with that input's range, so the batch has no padding here: packed, the
    model's inputs to each GEMM would hold fewer rows than Hugging Face's, with other ranges."""
    from torch.ao.quantization import quantize_dynamic

    hf, fb = twins("BertModel", **SMALL)
    ids, tt, mask = inputs(PADDINGS["none"])
    real = mask.bool()
    with torch.no_grad():
        exact = fb.eval()(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
        ours = quantize_dynamic(fb, {torch.nn.Linear}, dtype=torch.qint8)(ids, token_type_ids=tt, attention_mask=mask)
        theirs = quantize_dynamic(hf.eval(), {torch.nn.Linear}, dtype=torch.qint8)(ids, token_type_ids=tt,
                                                                                  attention_mask=mask)
    check("int8", ours.last_hidden_state[real], theirs.last_hidden_state[real])
    assert (ours.last_hidden_state - exact)[real].abs().max() > 1e-4  # the int8 GEMMs ran


@pytest.mark.parametrize("reentrant", [True, False])
def test_lora_training_with_activation_checkpointing(reentrant):
    """peft's recipe for a frozen model that recomputes its layers: enable_input_require_grads,
    then checkpointing. With reentrant checkpointing and no adapter on the embeddings, the
    layers' adapters get gradients only because the embedding output requires grad."""
    hf, fb = twins("BertForSequenceClassification", num_labels=3, **SMALL)
    ids, tt, mask = inputs(PADDINGS["mixed"])
    labels = torch.tensor([0, 2, 1, 1])
    grads = []
    for model in (hf, fb):
        model = _lora(model.train(), 0, targets=["query", "value"])
        model.enable_input_require_grads()
        # Older transformers (5.17, for one) have only gradient_checkpointing_enable; fastbert has both.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": reentrant})
        model(input_ids=ids, token_type_ids=tt, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "lora_" in n and "encoder" in n})
    assert grads[1] and all(g is not None for g in grads[1].values())
    for name, g in grads[1].items():
        check(f"checkpointed lora grad[{name}]", g, grads[0][name])
    fb.disable_input_require_grads()
    assert not fb.get_input_embeddings()._forward_hooks


def test_bad_ids_raise_through_adapted_embeddings():
    _, fb = twins("BertModel", **SMALL)
    model = _lora(fb.eval(), 0)
    ids, tt, mask = inputs(PADDINGS["mixed"])
    for name, bad in (("input_ids", ids.masked_fill(mask.bool(), SMALL["vocab_size"])), ("token_type_ids", tt + 2)):
        kwargs = {"input_ids": ids, "token_type_ids": tt, "attention_mask": mask, name: bad}
        with pytest.raises(ValueError, match=f"{name} contains .*outside the valid range"):
            model(**kwargs)


def test_optimize_keeps_the_adapters_of_a_peft_model():
    """fastbert.optimize on Hugging Face's model with LoRA: the fastbert encoder shares the
    adapter modules and calls them; outputs and adapter gradients stay HF's."""
    import fastbert

    hf, _ = twins("BertForSequenceClassification", num_labels=3, **SMALL)
    model = _lora(hf.eval(), 0)
    ids, tt, mask = inputs(PADDINGS["mixed"])
    labels = torch.tensor([0, 2, 1, 1])
    before = model(input_ids=ids, token_type_ids=tt, attention_mask=mask, labels=labels)
    before.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    model.zero_grad()
    assert fastbert.optimize(model) is model
    assert isinstance(model.get_base_model().bert, fastbert.BertModel)
    after = model(input_ids=ids, token_type_ids=tt, attention_mask=mask, labels=labels)
    check("optimize+lora logits", after.logits, before.logits)
    after.loss.backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            check(f"optimize+lora grad[{name}]", p.grad, grads[name])


def test_accelerate_offloading_and_functional_call():
    """accelerate's cpu_offload keeps the weights on the meta device and sets each module's
    ``forward`` to one that brings its weights in: fastbert calls those modules. And
    ``torch.func.functional_call`` with other weights answers as a model holding them."""
    accelerate = pytest.importorskip("accelerate")
    import copy

    _, fb = twins("BertForSequenceClassification", num_labels=3, **SMALL)
    fb.eval()
    ids, tt, mask = inputs(PADDINGS["mixed"])
    with torch.no_grad():
        ref = fb(input_ids=ids, token_type_ids=tt, attention_mask=mask).logits
        offloaded = accelerate.cpu_offload(copy.deepcopy(fb), execution_device=torch.device("cpu"))
        assert offloaded.bert.encoder.layer[0].attention.self.query.weight.is_meta
        check("cpu_offload", offloaded(input_ids=ids, token_type_ids=tt, attention_mask=mask).logits, ref)
        scaled = {name: p * 1.1 for name, p in fb.named_parameters()}
        out = torch.func.functional_call(fb, scaled, (ids,), {"token_type_ids": tt, "attention_mask": mask}).logits
        twin = copy.deepcopy(fb)
        twin.load_state_dict(scaled, strict=False)
        check("functional_call", out, twin(input_ids=ids, token_type_ids=tt, attention_mask=mask).logits)
