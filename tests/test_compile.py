"""torch.compile(fullgraph=True) on fastbert models: no graph breaks, the same outputs and
gradients as the uncompiled model, under each fastbert backend whose kernels are in.

Compiled, BertModel runs the padded layout with the key-padding mask (unpadding would give
data-dependent shapes), so outputs are compared at real tokens; padded positions differ by
design. On the CPU the graphs are compiled with "aot_eager" (Dynamo + AOTAutograd, no code
generation, which takes minutes on a small CPU); inductor and CUDA graphs run on a GPU.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import fastbert
from fastbert import ops
from utils import unavailable_kernels

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# The ops on the compiled path (a 2-D mask takes the fused attention, not softmax_mask).
FUSED_PATH_OPS = ("embedding", "add_layernorm", "bias_gelu", "attention")


def backend_params():
    params = []
    for name in ("eager", "auto", "triton"):
        reason = None
        if name == "triton":
            if unavailable_kernels(FUSED_PATH_OPS):
                reason = "the C++ extension is not built (FASTBERT_SKIP_EXT)"
        elif name == "auto" and not CUDA and not ops.kernel_available("embedding"):
            reason = "on the CPU 'auto' differs from 'eager' only by the C++ embedding op, which is not built here"
        params.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=reason or "")))
    return pytest.mark.parametrize("backend", params)


def tiny_config(**kw):
    base = dict(vocab_size=53, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                max_position_embeddings=24, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(kw)
    return fastbert.BertConfig(**base)


def inputs(batch=3, seqlen=9):
    ids = torch.randint(1, 53, (batch, seqlen), device=DEVICE)
    types = torch.randint(0, 2, (batch, seqlen), device=DEVICE)
    lengths = torch.randint(1, seqlen + 1, (batch,))
    lengths[0], lengths[-1] = seqlen, 1  # a full row and a length-1 row
    mask = (torch.arange(seqlen) < lengths[:, None]).long().to(DEVICE)
    return ids, types, mask


def assert_real_close(actual, expected, mask=None, atol=1e-5, rtol=1e-5, what="output"):
    if mask is not None:
        actual, expected = actual[mask.bool()], expected[mask.bool()]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


@backend_params()
def test_compiled_bert_model_matches(backend, fresh_dynamo):
    fastbert.set_backend(backend)
    model = fastbert.BertModel(tiny_config()).to(DEVICE).eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # Dynamo alone: tracing and fake tensors
    ids, types, mask = inputs()
    with torch.no_grad():
        cases = [
            ("2-D mask", dict(attention_mask=mask, token_type_ids=types), mask),
            ("no mask", dict(token_type_ids=types), None),
            ("hidden states", dict(attention_mask=mask, output_hidden_states=True), mask),
        ]
        if backend != "eager" and not CUDA:
            cases = cases[:1]  # the kernels' compile paths; the other cases only change model code (time)
        for what, kwargs, keep in cases:
            got, expected = compiled(ids, **kwargs), model(ids, **kwargs)
            assert_real_close(got.last_hidden_state, expected.last_hidden_state, keep, what=f"{what}: last_hidden_state")
            assert_real_close(got.pooler_output, expected.pooler_output, what=f"{what}: pooler_output")
            if kwargs.get("output_hidden_states"):
                assert len(got.hidden_states) == len(expected.hidden_states) == 2
                for i, (h, e) in enumerate(zip(got.hidden_states, expected.hidden_states)):
                    assert_real_close(h, e, mask, what=f"hidden_states[{i}]")
    assert graph_breaks() == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == len(cases)  # one whole graph per call signature


@backend_params()
def test_compiled_classifier_loss_and_gradients(backend, fresh_dynamo):
    """Training through the compiled model: loss, logits and every parameter gradient."""
    check_compiled_training(backend, "aot_eager")


@pytest.mark.gpu
def test_inductor_training_on_gpu(fresh_dynamo):
    """Inductor's graphs of the forward and the backward, with every Triton launch
    functionalized (each written argument copied, the copies written back)."""
    check_compiled_training("auto", "inductor")


def check_compiled_training(backend: str, compiler: str) -> None:
    fastbert.set_backend(backend)
    model = fastbert.BertForSequenceClassification(tiny_config()).to(DEVICE).train()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    ids, types, mask = inputs()
    labels = torch.tensor([0, 2, 1], device=DEVICE)

    def run(fn):
        model.zero_grad(set_to_none=True)
        out = fn(ids, attention_mask=mask, token_type_ids=types, labels=labels)
        out.loss.backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters()}

    (got, got_grads), (expected, expected_grads) = run(compiled), run(model)
    assert_real_close(got.logits, expected.logits, what="logits")
    assert_real_close(got.loss, expected.loss, what="loss")
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        # Summed over the batch in a different order (padded vs packed tokens): fp32 rounding.
        assert_real_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, what=f"grad of {name}")
    assert graph_breaks() == 0, dict(counters["graph_break"])


def test_first_compile_in_a_fresh_process(fresh_dynamo):
    """Compiling before any eager call, under the default backend: the op registry must not
    import a kernel module while Dynamo traces."""
    fastbert.set_backend("auto")
    saved = dict(ops._kernels), dict(ops._chosen)
    ops._kernels.clear()  # as in a fresh process: nothing resolved or imported through the registry yet
    ops._chosen.clear()
    try:
        model = fastbert.BertModel(tiny_config()).to(DEVICE).eval()
        ids, types, mask = inputs()
        with torch.no_grad():
            got = torch.compile(model, fullgraph=True, backend="eager")(ids, attention_mask=mask, token_type_ids=types)
    finally:
        ops._kernels.update(saved[0])
        ops._chosen.update(saved[1])
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, token_type_ids=types)
    assert_real_close(got.last_hidden_state, expected.last_hidden_state, mask)


def test_explain_finds_no_graph_break(fresh_dynamo):
    model = fastbert.BertForSequenceClassification(tiny_config()).to(DEVICE).eval()
    ids, types, mask = inputs()
    with torch.no_grad():
        model(ids, attention_mask=mask)  # resolves the kernels (see the test above)
        explanation = torch._dynamo.explain(model)(ids, attention_mask=mask, token_type_ids=types)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_switching_backend_retraces(fresh_dynamo):
    """The chosen implementation is baked into a graph; Dynamo guards on the backend."""
    model = fastbert.BertModel(tiny_config()).to(DEVICE).eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    ids, types, mask = inputs()
    with torch.no_grad():
        with fastbert.use_backend("eager"):
            first = compiled(ids, attention_mask=mask)
        with fastbert.use_backend("auto"):
            second = compiled(ids, attention_mask=mask)
    assert counters["stats"]["unique_graphs"] == 2
    assert_real_close(first.last_hidden_state, second.last_hidden_state, mask, atol=1e-4, rtol=1e-4)


def test_dynamic_shapes_compile_once(fresh_dynamo):
    """One graph for every shape, also when the model is compiled before any eager call (the
    dispatch point's cache, first filled inside the trace, once failed the graph's guards)."""
    fastbert.set_backend("eager")
    fastbert.ops._chosen.clear()  # as in a fresh process, whatever ran before
    model = fastbert.BertModel(tiny_config()).to(DEVICE).eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    with torch.no_grad():
        for batch, seqlen in ((3, 9), (5, 17)):
            ids, types, mask = inputs(batch, seqlen)
            got, expected = compiled(ids, attention_mask=mask), model(ids, attention_mask=mask)
            assert_real_close(got.last_hidden_state, expected.last_hidden_state, mask, what=f"{batch}x{seqlen}")
    assert counters["stats"]["unique_graphs"] == 1
    assert graph_breaks() == 0


# --------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_inductor_on_gpu(mode, dtype, fresh_dynamo):
    """Inductor with the Triton custom ops traced in; "reduce-overhead" adds CUDA graphs."""
    fastbert.set_backend("auto")
    model = fastbert.BertForSequenceClassification(tiny_config(max_position_embeddings=128)).to("cuda", dtype).eval()
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        for _ in range(3):  # cudagraph trees record on the second call and replay after
            ids, types, mask = inputs(4, 100)
            got = compiled(ids, attention_mask=mask, token_type_ids=types).logits.clone()
            expected = model(ids, attention_mask=mask, token_type_ids=types).logits
            assert_real_close(got, expected, what=f"{mode} logits", **tol)
    assert graph_breaks() == 0


# -- torch.export and torch.jit.trace ------------------------------------------------------

def test_outputs_are_pytree_nodes():
    out = fastbert.outputs.SequenceClassifierOutput(loss=torch.tensor(1.0), logits=torch.ones(2, 3))
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    assert len(leaves) == 2 and all(isinstance(t, torch.Tensor) for t in leaves)
    again = torch.utils._pytree.tree_unflatten([t * 2 for t in leaves], spec)
    assert type(again) is type(out) and torch.equal(again.logits, out.logits * 2) and again.hidden_states is None


@backend_params()
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shape checks become constants of the trace
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
def test_export_and_jit_trace_run_other_masks(backend, fresh_dynamo):
    """An exported or traced model records the padded path (no value of the mask is read on
    the host), so it gives the eager model's outputs for masks other than the example's."""
    with fastbert.use_backend(backend):
        torch.manual_seed(0)
        model = fastbert.BertForSequenceClassification(tiny_config()).to(DEVICE).eval()
        ids, types, mask = inputs()
        other_ids, other_types, other_mask = inputs()
        other_mask[1, 2:] = 0
        want = model(other_ids, attention_mask=other_mask, token_type_ids=other_types).logits
        exported = torch.export.export(model, (ids,), {"attention_mask": mask, "token_type_ids": types}).module()
        got = exported(other_ids, attention_mask=other_mask, token_type_ids=other_types)
        assert type(got).__name__ == "SequenceClassifierOutput"
        assert_real_close(got.logits, want, what="exported")
        model.config.torchscript = True  # tuples, as HF's traceable models return
        try:
            traced = torch.jit.trace(model, (ids, mask, types))
        finally:
            model.config.torchscript = False
        assert_real_close(traced(other_ids, other_mask, other_types)[0], want, what="traced")


def test_dynamic_export_takes_square_inputs(fresh_dynamo):
    """An export with dynamic batch and length serves batch == seq_len too (comparing a shape
    with a tuple once made the program guard on batch != seq_len)."""
    model = fastbert.BertModel(tiny_config()).eval()
    positions = model.config.max_position_embeddings
    batch, length = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=positions)
    example = {k: torch.ones(2, 8, dtype=torch.long) for k in ("input_ids", "attention_mask", "token_type_ids")}
    program = torch.export.export(model, (), example, dynamic_shapes={k: {0: batch, 1: length} for k in example})
    for b, s in ((3, 7), (5, 5)):
        square = {k: torch.ones(b, s, dtype=torch.long) for k in example}
        torch.testing.assert_close(program.module()(**square).last_hidden_state, model(**square).last_hidden_state)


def test_saved_export_loads_in_a_fresh_process(tmp_path, fresh_dynamo):
    """A saved torch.export program holds fastbert's ops; a process that has only imported
    fastbert loads it after fastbert.ops.load_kernels() (README, "Export to ONNX")."""
    import subprocess
    import sys
    model = fastbert.BertModel(tiny_config()).eval()
    ids = torch.randint(1, 50, (2, 6))
    torch.export.save(torch.export.export(model, (ids,)), tmp_path / "model.pt2")
    torch.save(model(ids).last_hidden_state, tmp_path / "want.pt")
    code = ("import torch, fastbert; fastbert.ops.load_kernels(); "
            f"out = torch.export.load(r'{tmp_path / 'model.pt2'}').module()(torch.tensor({ids.tolist()})); "
            f"torch.testing.assert_close(out.last_hidden_state, torch.load(r'{tmp_path / 'want.pt'}')); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
