"""ONNX export: ``torch.onnx.export`` of fastbert models, run in ONNX Runtime.

While the exporter runs, every op takes its eager reference (``fastbert.ops.exporting_onnx``):
ONNX has no fastbert ops, and its standard ones (Gather, LayerNormalization, MatMul, Softmax,
Gelu...) are what ONNX Runtime fuses with its own BERT kernels. The exported graph runs the
padded path, so it takes any batch and sequence length, and its real positions and pooled
output agree with the model's.
"""

from __future__ import annotations

import pytest
import torch

import fastbert
from fastbert import BertConfig, BertForSequenceClassification, BertModel, ops

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")  # the torch.export-based exporter (the default) needs it
ort = pytest.importorskip("onnxruntime")

CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100)


def _inputs(batch, seqlen, pad_last=0):
    ids = torch.randint(1, CONFIG["vocab_size"], (batch, seqlen))
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    if pad_last:
        mask[-1, seqlen - pad_last:] = 0
    return ids, mask, torch.randint(0, 2, (batch, seqlen))


def _standard_ops_only(path):
    domains = {(node.domain, node.op_type) for node in onnx.load(path).graph.node}
    assert all(domain in ("", "ai.onnx") for domain, _ in domains), sorted(domains)
    assert not any("fastbert" in op or "triton" in op.lower() for _, op in domains), sorted(domains)


@pytest.mark.skipif(not ops.kernel_available("embedding"), reason="needs fastbert._C, the kernel to be replaced")
def test_export_runs_the_references():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(ops.implementation("embedding", x.device))
            return x + 1

    with fastbert.use_backend("triton"):
        assert ops.implementation("embedding", torch.device("cpu")) is not ops.OPS["embedding"].reference
        torch.onnx.export(Probe().eval(), (torch.ones(2),), dynamo=True)
    assert seen and all(fn is ops.OPS["embedding"].reference for fn in seen), seen
    assert not ops.exporting_onnx()


@pytest.mark.filterwarnings("ignore:# The axis name")  # three inputs share the batch and length dims
@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # torch's exporter's own
@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_export_with_dynamic_shapes_matches_the_model(tmp_path, backend):
    torch.manual_seed(0)
    model = BertModel(BertConfig(**CONFIG)).eval()
    ids, mask, types = _inputs(2, 7, pad_last=2)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=CONFIG.get("max_position_embeddings", 512))
    names = ("input_ids", "attention_mask", "token_type_ids")
    with fastbert.use_backend(backend):
        program = torch.onnx.export(model, (ids,), kwargs=dict(attention_mask=mask, token_type_ids=types), dynamo=True,
                                    dynamic_shapes={n: {0: batch, 1: seq} for n in names}, input_names=list(names),
                                    output_names=["last_hidden_state", "pooler_output"])
    path = str(tmp_path / "bert.onnx")
    program.save(path)
    _standard_ops_only(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for shape, pad in (((2, 7), 2), ((3, 11), 4), ((1, 1), 0)):
        ids, mask, types = _inputs(*shape, pad_last=pad)
        hidden, pooled = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                            "token_type_ids": types.numpy()})
        with torch.no_grad():
            ref = model(ids, attention_mask=mask, token_type_ids=types)
        real = mask.bool()
        torch.testing.assert_close(torch.from_numpy(hidden)[real], ref.last_hidden_state[real], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(pooled), ref.pooler_output, atol=2e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # fastbert's shape checks, constants in the trace
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's own
def test_torchscript_export_of_a_head(tmp_path):
    """The older exporter (``dynamo=False``) traces with torch.jit, which takes tuples and dicts:
    outputs left to the config are tuples while it traces (``fastbert.outputs.wants_dict``)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**CONFIG, num_labels=3)).eval()
    ids, mask, _ = _inputs(2, 7, pad_last=3)
    path = str(tmp_path / "head.onnx")
    torch.onnx.export(model, (ids, mask), path, dynamo=False, input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                                             "attention_mask": {0: "batch", 1: "seq"}})
    _standard_ops_only(path)
    assert isinstance(model(ids, attention_mask=mask), fastbert.outputs.SequenceClassifierOutput)
    ids, mask, _ = _inputs(3, 9, pad_last=5)
    (logits,) = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(torch.from_numpy(logits), ref, atol=2e-5, rtol=1e-4)
