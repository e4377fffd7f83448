"""BERT, top to bottom as the paper tells it: embeddings, self-attention, feed-forward,
the layer, the encoder, the pooler, and the model.

Module and parameter names are Hugging Face's (``embeddings.LayerNorm``,
``encoder.layer.N.attention.self.query`` …), so state dicts load both ways. Modules hold
parameters and call ``fastbert.functional``; the kernels are chosen there.

With a 2-D ``attention_mask`` that has padding, the real tokens are gathered once before
the embedding and every layer runs on the packed tokens; the output is scattered back at
the end, with zeros at padded positions. Hugging Face computes those positions (padded
queries still attend to the real keys); no loss or pooler reads them, so real positions,
pooled outputs and losses with ``-100`` at padding agree with HF.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import functional as fb
from .backend import in_this_backend
from .config import BertConfig
from .functional import mark_cu_seqlens_checked
from .inputs import check_forward_kwargs, check_model_inputs, embeds_in, full_ids
from .outputs import BaseModelOutputWithPoolingAndCrossAttentions, wants_dict
from .ops import load_kernels
from .padding import Packing, pad, unpad_mask
from .padding import unpad as gather_tokens
from .qkv import fused_qkv, place_side_by_side
from .pretrained import BertPreTrainedModel

_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def gelu_form(hidden_act) -> Optional[str]:
    """The ``approximate`` argument of a GELU activation's name, None for other activations."""
    if isinstance(hidden_act, str):
        if hidden_act in ("gelu", "gelu_python"):
            return "none"
        if hidden_act in _TANH_GELUS:
            return "tanh"
    return None


def plain(module: nn.Module, cls=nn.Linear) -> bool:
    """``module`` runs ``cls.forward`` and nothing else, so its parameters may be read directly
    and fused with its neighbours' work (Q, K and V in one GEMM, a bias into the next kernel).
    Anything else is called as the module it is: an adapter wrapping it (peft's LoRA), a
    quantized or 8-bit replacement, a subclass with its own forward, a forward set on the
    instance (accelerate's offloading hooks), or a hook on it (reading the weights would skip
    them all, silently)."""
    return (type(module).forward is cls.forward and "forward" not in module.__dict__
            and not module._forward_hooks and not module._forward_pre_hooks
            and not module._backward_hooks and not module._backward_pre_hooks)


def dense_activation(hidden_act, x: torch.Tensor, dense: nn.Module) -> torch.Tensor:
    """act(dense(x)): for a GELU, ``linear_gelu`` (the bias and the GELU fused after the GEMM,
    or into it); otherwise the GEMM and then the activation."""
    form = gelu_form(hidden_act)
    if not plain(dense):
        h = dense(x)
        return F.gelu(h, approximate=form) if form is not None else _activation(hidden_act, h)
    if form is not None:
        return fb.linear_gelu(x, dense.weight, dense.bias, form)
    return _activation(hidden_act, F.linear(x, dense.weight, dense.bias))


def _activation(hidden_act, h: torch.Tensor) -> torch.Tensor:
    if hidden_act == "relu":
        return F.relu(h)
    if callable(hidden_act):
        return hidden_act(h)
    raise ValueError(f"unsupported hidden_act {hidden_act!r}")


def table_rows(table: nn.Module) -> int:
    """An embedding's row count, through an adapter wrapping it (its ``weight`` is the table's)."""
    return table.weight.shape[0]


class BertEmbeddings(nn.Module):
    """LayerNorm(token + segment + position embeddings), then dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Not saved (persistent=False), as in HF: the default positions and token types.
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(1, config.max_position_embeddings, dtype=torch.long),
                             persistent=False)

    def _apply(self, fn, recurse=True):
        # The two buffers are constants that no state dict carries: after to_empty() (a model
        # built on the meta device, then loaded) they would hold whatever the memory held.
        out = super()._apply(fn, recurse)
        for name, fill in (("position_ids", torch.arange), ("token_type_ids", None)):
            buffer = getattr(self, name, None)
            if isinstance(buffer, torch.Tensor) and not buffer.is_meta:
                with torch.no_grad():
                    if fill is None:
                        buffer.zero_()
                    else:
                        buffer.copy_(fill(buffer.shape[-1], device=buffer.device).expand_as(buffer))
        return out

    def forward(self, input_ids, token_type_ids, position_ids, inputs_embeds=None):
        """Ids of any one shape (padded (B, S) or packed (T,)); returns that shape + (hidden,)."""
        p = self.dropout.p if self.training else 0.0
        tables = (self.word_embeddings, self.position_embeddings, self.token_type_embeddings)
        fused_norm = plain(self.LayerNorm, nn.LayerNorm)
        if inputs_embeds is None and not (fused_norm and all(plain(t, nn.Embedding) for t in tables)):
            fb.check_index_range("embedding", "input_ids", input_ids, table_rows(self.word_embeddings))
            inputs_embeds = self.word_embeddings(input_ids)
        if inputs_embeds is None:
            return fb.embedding(
                input_ids, token_type_ids, position_ids, self.word_embeddings.weight,
                self.position_embeddings.weight, self.token_type_embeddings.weight,
                self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps, p, self.word_embeddings.padding_idx)
        fb.check_index_range("embedding", "position_ids", position_ids, table_rows(self.position_embeddings))
        fb.check_index_range("embedding", "token_type_ids", token_type_ids, table_rows(self.token_type_embeddings))
        extra = self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        if not fused_norm:
            return self.dropout(self.LayerNorm(inputs_embeds + extra.to(inputs_embeds.dtype)))
        h = fb.add_layernorm(inputs_embeds, extra.to(inputs_embeds.dtype), self.LayerNorm.weight,
                             self.LayerNorm.bias, self.LayerNorm.eps)
        return F.dropout(h, p, self.training)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention. Q, K and V come from one GEMM, whose weight is the three
    projections' weights side by side (``fastbert.qkv``)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.all_head_size = config.hidden_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.place_qkv()
        self.register_load_state_dict_post_hook(_place_qkv_after_load)

    def place_qkv(self) -> bool:
        """Lay the three projections' weights (and biases) end to end, so that the fused
        GEMM's weight is a view of them (``fastbert.qkv``); a no-op when they already are."""
        return place_side_by_side((self.query, self.key, self.value))

    def _apply(self, fn, recurse=True):
        # .to(), .half(), .cuda()… convert each parameter on its own: lay them out again.
        out = super()._apply(fn, recurse)
        self.place_qkv()
        return out

    def __setstate__(self, state):
        # copy.deepcopy and unpickling copy each parameter on its own.
        super().__setstate__(state)
        self.place_qkv()

    def qkv_weight(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The fused (3H, H) weight and (3H,) bias: views of the parameters (see
        ``fastbert.qkv``), concatenated where they are not laid out for it and while
        torch.compile or a trace records."""
        return fused_qkv((self.query, self.key, self.value), traced=_tracing())

    def forward(self, hidden_states, attention_mask=None, packing: Optional[Packing] = None,
                additive_mask=None, output_attentions=False):
        """hidden_states is packed (T, H) when ``packing`` is given, else padded (B, S, H).

        ``attention_mask`` is a (B, S) key-padding mask for the fused kernel;
        ``additive_mask`` (broadcastable to (B, heads, S, S)) selects the unfused path,
        which is also taken to return the attention probabilities.
        """
        lead = hidden_states.shape[:-1]
        heads = (*lead, self.num_attention_heads, self.attention_head_size)
        projections = (self.query, self.key, self.value)
        if all(plain(m) for m in projections):
            weight, bias = self.qkv_weight()
            qkv = F.linear(hidden_states, weight, bias).view(*lead, 3, *heads[-2:])
        else:
            qkv = torch.stack([m(hidden_states).view(heads) for m in projections], dim=-3)
        p = self.dropout.p if self.training else 0.0
        if output_attentions or additive_mask is not None:
            q, k, v = qkv.unbind(-3)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
            probs = fb.softmax_mask(scores, additive_mask, self.attention_head_size ** -0.5, p)
            context = torch.einsum("bhqk,bkhd->bqhd", probs, v)
        else:
            probs = None
            if packing is not None:
                context = fb.attention_qkv(qkv, cu_seqlens=packing.cu_seqlens, max_seqlen=packing.max_seqlen, dropout_p=p)
            else:
                context = fb.attention_qkv(qkv, attention_mask, dropout_p=p)
        return context.reshape(*lead, self.all_head_size), probs


def _place_qkv_after_load(module: BertSelfAttention, incompatible_keys) -> None:
    # load_state_dict(assign=True) puts the loaded tensors in place of the parameters.
    module.place_qkv()


class BertSelfOutput(nn.Module):
    """Output projection, dropout, residual add and LayerNorm (one fused kernel after the GEMM)."""

    def __init__(self, config: BertConfig, in_features: Optional[int] = None):
        super().__init__()
        self.dense = nn.Linear(in_features or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        p = self.dropout.p if self.training else 0.0
        norm = self.LayerNorm
        if not plain(norm, nn.LayerNorm):
            return norm(self.dropout(self.dense(hidden_states)) + input_tensor)
        if not plain(self.dense):
            return fb.add_layernorm(self.dense(hidden_states), input_tensor, norm.weight, norm.bias, norm.eps, dropout_p=p)
        return fb.add_layernorm(F.linear(hidden_states, self.dense.weight), input_tensor, norm.weight, norm.bias,
                                norm.eps, x_bias=self.dense.bias, dropout_p=p)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, attention_mask=None, packing=None, additive_mask=None, output_attentions=False):
        context, probs = self.self(hidden_states, attention_mask, packing, additive_mask, output_attentions)
        return self.output(context, hidden_states), probs


class BertIntermediate(nn.Module):
    """The feed-forward expansion: GEMM, bias and activation (fused for a GELU)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.hidden_act = config.hidden_act

    def forward(self, hidden_states):
        return dense_activation(self.hidden_act, hidden_states, self.dense)


class BertOutput(BertSelfOutput):
    """The feed-forward contraction, with dropout, residual add and LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__(config, in_features=config.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, attention_mask=None, packing=None, additive_mask=None, output_attentions=False):
        attention_output, probs = self.attention(hidden_states, attention_mask, packing, additive_mask, output_attentions)
        return self.output(self.intermediate(attention_output), attention_output), probs


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False
        self.checkpoint_kwargs = {}  # passed to torch.utils.checkpoint (HF's activation_checkpointing_kwargs)
        self.checkpoint_every = 1  # layers 0, n, 2n... are recomputed
        self.checkpoint_offload = False  # their saved inputs wait in pinned host memory

    def forward(self, hidden_states, attention_mask=None, packing=None, additive_mask=None,
                output_attentions=False, output_hidden_states=False):
        all_hidden = [hidden_states] if output_hidden_states else None
        all_probs = [] if output_attentions else None
        for i, layer in enumerate(self.layer):
            args = (hidden_states, attention_mask, packing, additive_mask, output_attentions)
            if (self.gradient_checkpointing and self.training and torch.is_grad_enabled()
                    and i % self.checkpoint_every == 0):
                kwargs = {"use_reentrant": False, **self.checkpoint_kwargs}
                offload = (torch.autograd.graph.save_on_cpu(pin_memory=hidden_states.is_cuda)
                           if self.checkpoint_offload else contextlib.nullcontext())
                with offload:
                    run = layer if _tracing() else in_this_backend(layer)  # recomputed under this backend
                    hidden_states, probs = torch.utils.checkpoint.checkpoint(run, *args, **kwargs)
            else:
                hidden_states, probs = layer(*args)
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            if all_probs is not None:
                all_probs.append(probs)
        return hidden_states, all_hidden, all_probs


class BertPooler(nn.Module):
    """tanh(dense(h[CLS]))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))


def _keep_to_additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 1=keep mask to Hugging Face's additive form: 0 where kept, the dtype's minimum elsewhere."""
    return torch.zeros((), dtype=dtype, device=keep.device).masked_fill(keep == 0, torch.finfo(dtype).min).expand(keep.shape).contiguous()


class BertModel(BertPreTrainedModel):
    """The BERT encoder: embeddings, ``num_hidden_layers`` layers, and an optional pooler.

    ``forward`` takes Hugging Face's arguments and returns its output (``last_hidden_state``,
    ``pooler_output``, ``hidden_states``, ``attentions``; tuple indexing and
    ``return_dict=False`` work). ``attention_mask`` may be

    * 2-D (batch, seq_len), nonzero at real tokens: the fused path. Unless ``unpad`` is
      False, the encoder runs on the packed real tokens and ``last_hidden_state`` and
      ``hidden_states`` are **zeros at padded positions**; Hugging Face computes values
      there (padded queries attend to the real keys). Real positions agree.
    * 3-D (batch, seq_len, seq_len), nonzero where query i may attend to key j
      (HF 5.x refuses 3-D masks; HF 4.x read them this way).
    * 4-D (batch, 1 or heads, 1 or seq_len, seq_len): floating point is additive (0 to
      keep, a large negative value to mask), boolean or integer is 1=keep, as HF's sdpa
      path reads them.

    3-D and 4-D masks and ``output_attentions=True`` take the unfused path (GEMM, fused
    scale+mask+softmax, GEMM). A query row whose keys are all masked (a fully padded
    sequence) gets zero attention probabilities and zero outputs; HF spreads it uniformly.

    ``unpad`` (the attribute, or ``forward``'s keyword for one call) is skipped under
    ``torch.compile`` and CUDA-graph capture, where shapes must not depend on the data; then
    the fused attention takes the key-padding mask instead and padded positions hold values
    computed as in HF. The heads run padded when their loss reads padded positions.
    """

    supports_gradient_checkpointing = True

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.unpad = True
        # Set only by fastbert.cuda_graphs while it warms up and captures a packed bucket:
        # the packing of the bucket's static buffers, used in place of one read from the mask.
        self.static_packing: Optional[Packing] = None
        self.post_init()
        load_kernels()  # torch.compile cannot trace the first import of a kernel module

    def _checked_static_packing(self, batch: int, seqlen: int) -> Packing:
        packing = self.static_packing
        if (packing.batch, packing.seqlen) != (batch, seqlen):
            raise ValueError(f"the static packing is for inputs of shape {(packing.batch, packing.seqlen)}, "
                             f"got {(batch, seqlen)}")
        # Built by fastbert.cuda_graphs: valid by construction, and it may hold spare tokens
        # after the last sequence, which the public check of cu_seqlens would refuse.
        mark_cu_seqlens_checked(packing.cu_seqlens, packing.max_seqlen)
        return packing

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                unpad: Optional[bool] = None, **kwargs):
        check_forward_kwargs(kwargs)
        unpad = self.unpad if unpad is None else unpad
        config = self.config
        output_attentions = bool(getattr(config, "output_attentions", False) if output_attentions is None else output_attentions)
        output_hidden_states = bool(getattr(config, "output_hidden_states", False) if output_hidden_states is None
                                    else output_hidden_states)
        return_dict = wants_dict(config, return_dict)

        table = self.embeddings.word_embeddings.weight
        device = table.device
        if table.is_meta:  # offloaded (accelerate's cpu_offload): hooks bring each weight in, where the inputs are
            device = (input_ids if input_ids is not None else inputs_embeds).device
        batch, seqlen = check_model_inputs(config, device, input_ids, inputs_embeds, attention_mask, token_type_ids,
                                           position_ids)
        inputs_embeds = embeds_in(inputs_embeds, table.dtype)
        position_ids, token_type_ids = full_ids(self.embeddings, input_ids, token_type_ids, position_ids, batch, seqlen)

        dtype = inputs_embeds.dtype if inputs_embeds is not None else table.dtype
        key_mask = additive = packing = None
        if attention_mask is not None and attention_mask.dim() == 2:
            if output_attentions:
                additive = _keep_to_additive(attention_mask[:, None, None, :], dtype)
            else:
                key_mask = attention_mask
        elif attention_mask is not None:
            additive = attention_mask[:, None] if attention_mask.dim() == 3 else attention_mask
            if attention_mask.dim() == 3 or not additive.is_floating_point():
                additive = _keep_to_additive(additive, dtype)

        if key_mask is not None and getattr(self, "static_packing", None) is not None:
            packing, key_mask = self._checked_static_packing(batch, seqlen), None
        elif key_mask is not None and unpad and not _tracing() and not _capturing(device):
            packing = unpad_mask(key_mask)  # None without padding: no gather, no scatter
            if packing is not None and packing.leading_pad:
                packing = None  # left padding: position 0 is a pad that the pooler reads, computed as HF does
            else:
                key_mask = None
        if packing is not None:
            ids = [None if t is None else gather_tokens(t, packing) for t in (input_ids, token_type_ids, position_ids, inputs_embeds)]
            hidden = self.embeddings(*ids)
        else:
            hidden = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)

        sequence, all_hidden, all_probs = self.encoder(hidden, key_mask, packing, additive, output_attentions, output_hidden_states)
        if packing is not None:
            sequence = pad(sequence, packing)
            all_hidden = None if all_hidden is None else [pad(h, packing) for h in all_hidden]
        pooled = self.pooler(sequence) if self.pooler is not None else None
        out = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=sequence, pooler_output=pooled,
            hidden_states=None if all_hidden is None else tuple(all_hidden),
            attentions=None if all_probs is None else tuple(all_probs), cross_attentions=None if all_probs is None else ())
        return out if return_dict else out.to_tuple()


def _tracing() -> bool:
    """torch.compile, torch.export or torch.jit.trace is recording: the graph must not depend
    on the mask's values, so the padded path runs (unpadding reads the mask on the host)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
