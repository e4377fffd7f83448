"""The fused QKV weight is a view of the three projections' parameters (fastbert.qkv): laid
out side by side when a model is built, converted or loaded, read without a copy in every
grad mode, and concatenated (correctly, if slower) wherever the layout is lost."""

import copy
import gc
import io
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastbert
from fastbert.qkv import fused_qkv, joint, place_side_by_side, side_by_side

from hf_bert import PADDINGS, check, config_kwargs, inputs, twins


def _attentions(model):
    return [m for m in model.modules() if isinstance(m, fastbert.modeling.BertSelfAttention)]


def _is_view(attention) -> bool:
    """The fused weight and bias start at the query projection's: views, not copies."""
    weight, bias = attention.qkv_weight()
    return (weight.data_ptr() == attention.query.weight.data_ptr()
            and bias.data_ptr() == attention.query.bias.data_ptr())


def _expected(attention):
    ps = [(m.weight, m.bias) for m in (attention.query, attention.key, attention.value)]
    return torch.cat([w for w, _ in ps]), torch.cat([b for _, b in ps])


def _pair():
    hf, fb = twins("BertModel", **config_kwargs("h96-6h-3l-gelu_new", type_vocab_size=3))
    return hf.eval(), fb.eval()


class _CountCat(TorchDispatchMode):
    """Counts concatenations of the projections' parameters."""

    def __init__(self, model):
        super().__init__()
        self.params = {p.data_ptr() for a in _attentions(model) for m in (a.query, a.key, a.value)
                       for p in (m.weight, m.bias)}
        self.cats = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.cat:
            self.cats += any(t.data_ptr() in self.params for t in args[0])
        return func(*args, **(kwargs or {}))


def test_fused_weight_is_a_view_after_build_conversion_and_load(tmp_path):
    _, fb = _pair()
    params = {name: p for name, p in fb.named_parameters()}
    for step in ("built", "half", "float", "double", "load", "load-assign"):
        if step in ("half", "float", "double"):
            getattr(fb, step)()
        elif step == "load":
            fb.load_state_dict({k: v.clone() for k, v in fb.state_dict().items()})
        elif step == "load-assign":
            fb.load_state_dict({k: v.clone() for k, v in fb.state_dict().items()}, assign=True)
        for attention in _attentions(fb):
            assert _is_view(attention), step
            weight, bias = attention.qkv_weight()
            expected = _expected(attention)
            assert torch.equal(weight, expected[0]) and torch.equal(bias, expected[1]), step
        if step != "load-assign":  # assign=True replaces the parameters by design
            assert all(p is params[name] for name, p in fb.named_parameters()), step
    fb.save_pretrained(tmp_path)  # safetensors takes the side-by-side parameters
    again = fastbert.BertModel.from_pretrained(tmp_path, dtype=torch.float16)
    assert all(_is_view(a) for a in _attentions(again))
    for (name, p), q in zip(again.state_dict().items(), fb.state_dict().values()):
        assert torch.equal(p, q.to(p.dtype)), name


def test_no_copy_in_any_grad_mode_and_outputs_match_hf():
    hf, fb = _pair()
    ids, tt, mask = inputs(PADDINGS["mixed"], types=3)
    real = mask.bool()
    with torch.no_grad():
        theirs = hf(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
    for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        with mode(), _CountCat(fb) as counter:
            ours = fb(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
        assert counter.cats == 0, mode.__name__
        check(f"side by side, {mode.__name__}", ours[real], theirs[real])


def test_gradients_and_optimizer_steps_through_the_view():
    hf, fb = _pair()
    ids, tt, mask = inputs(PADDINGS["mixed"], types=3)
    real = mask.bool()
    opt_fb = torch.optim.SGD(fb.parameters(), lr=1e-4)
    opt_hf = torch.optim.SGD(hf.parameters(), lr=1e-4)
    for step in range(2):
        for model, opt in ((fb, opt_fb), (hf, opt_hf)):
            opt.zero_grad()
            out = model(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
            out[real].square().sum().backward()
        names = ("query", "key", "value")
        for layer_fb, layer_hf in zip(fb.encoder.layer, hf.encoder.layer):
            for name in names:
                ours, theirs = getattr(layer_fb.attention.self, name), getattr(layer_hf.attention.self, name)
                check(f"step {step} {name}.weight grad", ours.weight.grad, theirs.weight.grad)
                check(f"step {step} {name}.bias grad", ours.bias.grad, theirs.bias.grad)
        opt_fb.step(), opt_hf.step()  # in place: the fused view follows
        assert all(_is_view(a) for a in _attentions(fb))
    with torch.no_grad():
        check("after two steps", fb(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state[real],
              hf(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state[real])


def test_lost_layout_falls_back_to_a_copy():
    """Parameters replaced from outside lose the layout: the fused weight is then
    concatenated (current, never stale); placing them again restores the view."""
    _, fb = _pair()
    ids, tt, mask = inputs(PADDINGS["mixed"], types=3)
    with torch.no_grad():
        ref = fb(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
    twin = copy.deepcopy(fb)
    assert all(_is_view(a) for a in _attentions(twin))  # laid out again after the copy
    attention = _attentions(twin)[0]
    attention.key.weight = nn.Parameter(attention.key.weight.detach().clone())
    assert not _is_view(attention)
    with torch.no_grad(), _CountCat(twin) as counter:
        out = twin(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
    assert counter.cats > 0 and torch.equal(out, ref)
    with torch.no_grad():
        attention.key.weight.mul_(2)
        changed = twin(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
    assert not torch.equal(changed, ref)
    assert attention.place_qkv() and _is_view(attention)
    with torch.no_grad():
        assert torch.equal(twin(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state, changed)



def test_layout_remembered_but_never_stale():
    """fused_qkv remembers the last layout it found; a parameter whose memory is swapped under
    the same object (``p.data = ...``: the same address with other strides, another shape,
    another tensor) or replaced is seen on the next call, and a conversion lets the old
    layout's memory go."""
    hf, fb = _pair()
    ids, tt, mask = inputs(PADDINGS["mixed"], types=3)
    real = mask.bool()

    def compare(step):
        with torch.no_grad():
            check(step, fb(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state[real],
                  hf(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state[real])
    compare("remembered")
    ours, theirs = _attentions(fb)[0], hf.encoder.layer[0].attention.self
    with torch.no_grad():
        # The same address, shape and dtype, transposed: the view of the old layout would be wrong.
        ours.query.weight.data = ours.query.weight.data.t()
        theirs.query.weight.data = theirs.query.weight.data.t().contiguous()
    compare("query weight transposed in place")
    ours.key.weight = nn.Parameter(ours.key.weight.detach() * 2)
    theirs.key.weight = nn.Parameter(theirs.key.weight.detach() * 2)
    compare("key weight replaced")
    assert ours.place_qkv() and _is_view(ours)
    compare("laid out again")
    old = weakref.ref(ours.query.weight.untyped_storage())
    fb.double(), hf.double()
    gc.collect()
    assert old() is None  # the old layout's memory is not held
    compare("converted")


def test_projections_without_a_bias():
    """HF's projections run without a bias too (``key.bias = None``): the fused bias then has
    zeros in its place, or is absent when no projection has one."""
    hf, fb = _pair()
    ids, tt, mask = inputs(PADDINGS["mixed"], types=3)
    real = mask.bool()
    for names in (("key",), ("query", "key", "value")):
        for model in (hf, fb):
            for name in names:
                getattr(model.encoder.layer[1].attention.self, name).bias = None
        for mode in (torch.no_grad, torch.enable_grad):
            with mode():
                ours = fb(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
                theirs = hf(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
            check(f"no bias on {names}, {mode.__name__}", ours[real], theirs[real])
        ours[real].sum().backward()
        assert fb.encoder.layer[1].attention.self.query.weight.grad is not None


def test_pickled_model_and_shared_memory_keep_working():
    _, fb = _pair()
    buffer = io.BytesIO()
    torch.save(fb, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert all(_is_view(a) for a in _attentions(loaded))
    ids, _, mask = inputs(PADDINGS["mixed"])
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).last_hidden_state, fb(ids, attention_mask=mask).last_hidden_state)
    fb.share_memory()
    assert all(_is_view(a) for a in _attentions(fb))


def test_side_by_side_only_for_tensors_laid_end_to_end():
    whole = torch.arange(24.0).reshape(6, 4)
    view = side_by_side([whole[:2], whole[2:3], whole[3:]])
    assert view is not None and view.data_ptr() == whole.data_ptr() and torch.equal(view, whole)
    assert side_by_side([whole[:2], whole[3:]]) is None  # a gap
    assert side_by_side([whole[2:4], whole[:2]]) is None  # out of order
    assert side_by_side([whole[:, :2], whole[:, 2:]]) is None  # not contiguous
    assert side_by_side([whole[:2], whole[2:].double()]) is None
    # Adjacent memory of two separate storages is not one tensor.
    a = torch.empty(64)
    assert side_by_side([a[:8], a[8:].clone()]) is None
    parts = [torch.randn(2, 3, requires_grad=True) for _ in range(3)]
    assert torch.equal(joint(parts), torch.cat(parts))


def test_place_side_by_side_skips_what_it_cannot_lay_out():
    def linears(**kw):
        return [nn.Linear(4, 4, **kw) for _ in range(3)]
    assert not place_side_by_side(linears(bias=False))
    assert not place_side_by_side(linears(device="meta"))
    mixed = linears()
    mixed[1].half()
    assert not place_side_by_side(mixed)
    wrapped = linears()
    wrapped[0] = nn.Sequential(wrapped[0])
    assert not place_side_by_side(wrapped)
    plain = linears()
    before = [m.weight.detach().clone() for m in plain]
    assert place_side_by_side(plain)
    assert all(torch.equal(m.weight, b) for m, b in zip(plain, before))
    weight, bias = fused_qkv(plain)
    assert weight.data_ptr() == plain[0].weight.data_ptr() and bias.data_ptr() == plain[0].bias.data_ptr()
    traced_weight, _ = fused_qkv(plain, traced=True)
    assert traced_weight.data_ptr() != weight.data_ptr() and torch.equal(traced_weight, weight)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_to_device_lays_out_again(device):
    _, fb = _pair()
    fb.to(device, torch.float16 if device == "cuda" else torch.float64)
    assert all(_is_view(a) for a in _attentions(fb))


def test_built_on_meta_then_to_empty_and_loaded():
    """The big-model loading path: build on the meta device, to_empty(), load_state_dict.
    The projections are laid out again, and the constant buffers (default positions and
    token types, in no state dict) hold their values, not whatever the memory held."""
    hf, ref = _pair()
    with torch.device("meta"):
        model = fastbert.BertModel(ref.config)
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    model.eval()
    assert all(_is_view(a) for a in _attentions(model))
    emb = model.embeddings
    assert torch.equal(emb.position_ids, torch.arange(emb.position_ids.shape[-1])[None])
    assert not emb.token_type_ids.any()
    ids, _, mask = inputs(PADDINGS["mixed"])
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).last_hidden_state
        theirs = hf(ids, attention_mask=mask).last_hidden_state
    check("meta, to_empty, load", ours[mask.bool()], theirs[mask.bool()])
