"""The base class of every fastbert model: weight initialisation, tying, and checkpoints
in Hugging Face's format (config.json + model.safetensors or pytorch_model.bin)."""

from __future__ import annotations

import os
import warnings
from typing import Dict, Optional, Union

import torch
from torch import nn

from .checkpoint import CheckpointError, read_state_dict, shard_bytes, write_state_dict  # noqa: F401 (re-exported)
from .config import BertConfig

# Keys some checkpoints carry that hold no weights of their own.
_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids")
# Keys of other heads that a checkpoint may carry; loading into a model without them drops them.
_OTHER_HEADS = ("cls.", "classifier.", "qa_outputs.", "pooler.")


def _resolve_dtype(dtype, config: BertConfig, state: Dict[str, torch.Tensor]) -> Optional[torch.dtype]:
    """A torch dtype from ``dtype``: a torch.dtype, its name ("float16"), or "auto" (the
    config's ``dtype``/``torch_dtype``, else the checkpoint's floating-point dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if name is None:
            floats = [t.dtype for t in state.values() if t.is_floating_point()]
            return floats[0] if floats else None
        dtype = str(name)
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, its name, or 'auto'; got {dtype!r}")
    return resolved


def _legacy_name(key: str) -> str:
    parts = key.split(".")
    if len(parts) > 1 and parts[-2] == "LayerNorm":
        parts[-1] = {"gamma": "weight", "beta": "bias"}.get(parts[-1], parts[-1])
    return ".".join(parts)


# from_pretrained options of Hugging Face's that concern downloads or its own loading
# machinery: nothing to do for a local checkpoint loaded whole (fastbert picks its kernels
# itself, whatever ``attn_implementation`` asks for).
HUB_LOADING_KWARGS = ("revision", "cache_dir", "force_download", "resume_download", "proxies", "local_files_only",
                       "token", "use_auth_token", "trust_remote_code", "low_cpu_mem_usage", "use_safetensors",
                       "attn_implementation", "_fast_init")


def _device_from_map(device_map, device):
    """The one device a ``device_map`` names ("cuda", "cuda:1", 0, torch.device, "auto", or
    a dict that puts everything on one device); fastbert does not split a model."""
    if device_map is None:
        return device
    if isinstance(device_map, dict):
        targets = set(device_map.values())
        if len(targets) != 1:
            raise ValueError("fastbert places a model on one device; device_map spreads it over "
                             f"{sorted(map(str, targets))}")
        device_map = targets.pop()
    if device_map == "auto":
        device_map = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        mapped = torch.device(device_map) if not isinstance(device_map, int) else torch.device("cuda", device_map)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map={device_map!r}: fastbert places a model on one device; give a device "
                         "(\"cuda\", \"cuda:1\", 0, \"cpu\") or \"auto\"") from None
    if device is not None and torch.device(device) != mapped:
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree")
    return mapped


def resized_vocab(old: int, new: Optional[int], multiple: Optional[int]) -> Optional[int]:
    """The row count ``resize_token_embeddings`` makes: ``new`` (or ``old``) rounded up to a
    multiple of ``multiple``; None when both are None (nothing to do)."""
    if multiple is not None:
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive int, got {multiple!r}")
        new = old if new is None else new
        new = -(-new // multiple) * multiple
    if new is None:
        return None
    if isinstance(new, bool) or not isinstance(new, int) or new < 1:
        raise ValueError(f"new_num_tokens must be a positive int, got {new!r}")
    return new


def resized_rows(old: torch.Tensor, fresh: torch.Tensor, mean_resizing: bool) -> torch.Tensor:
    """``fresh`` (new size, freshly initialised) with the rows it shares with ``old`` copied
    in. With ``mean_resizing`` the added rows are drawn around the old rows' mean, as
    Hugging Face does: a normal with the old rows' covariance scaled by 1e-9, or the mean
    itself where that covariance is not positive definite. Works for 1-D tensors (a bias)."""
    out = fresh.detach().clone()
    keep = min(old.shape[0], out.shape[0])
    out[:keep] = old.detach()[:keep]
    added = out.shape[0] - keep
    if added > 0 and mean_resizing:
        rows = old.detach().float()
        mean = rows.mean(0)
        if rows.dim() == 1:
            out[keep:] = torch.empty(added, device=out.device).normal_(mean.item(), 1e-9 * rows.std().item()).to(out.dtype)
            return out
        centred = rows - mean
        cov = 1e-9 * (centred.T @ centred) / rows.shape[0]
        if torch.distributions.constraints.positive_definite.check(cov).item():
            dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
            out[keep:] = dist.sample((added,)).to(out.dtype)
        else:
            out[keep:] = mean.to(out.dtype)
    return out


class BertPreTrainedModel(nn.Module):
    config_class = BertConfig
    base_model_prefix = "bert"

    def __init__(self, config: BertConfig):
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"config must be a fastbert.BertConfig, got {type(config).__name__}")
        self.config = config

    # -- initialisation -----------------------------------------------------------------
    def post_init(self) -> None:
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        """Heads with a decoder share its weight with the word embeddings."""

    # -- conveniences ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    main_input_name = "input_ids"

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters counted once (tied ones too), as Hugging Face counts them: only those
        that require a gradient with ``only_trainable``, without the embedding tables with
        ``exclude_embeddings`` (what HF's Trainer counts FLOPs with)."""
        skip = {f"{name}.weight" for name, m in self.named_modules() if isinstance(m, nn.Embedding)} \
            if exclude_embeddings else set()
        return sum(p.numel() for name, p in self.named_parameters()
                   if name not in skip and (p.requires_grad or not only_trainable))

    supports_gradient_checkpointing = True

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute encoder layers in the backward pass instead of keeping their activations
        (Hugging Face's method and options): layers 0, n, 2n… with ``every_n_layers=n``; with
        ``offload`` the checkpointed layers' inputs wait in pinned host memory. The kwargs go
        to ``torch.utils.checkpoint.checkpoint`` (``use_reentrant=False`` unless given)."""
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive int, got {every_n_layers!r}")
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = True
                m.checkpoint_kwargs = dict(activation_checkpointing_kwargs or {})
                m.checkpoint_every = every_n_layers
                m.checkpoint_offload = bool(offload)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        """The older name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    is_activation_checkpointing = is_gradient_checkpointing

    def activation_checkpointing_disable(self) -> None:
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = False

    gradient_checkpointing_disable = activation_checkpointing_disable

    def enable_input_require_grads(self) -> None:
        """Make the word embeddings' output require grad (Hugging Face's method), so that
        reentrant checkpointing of a frozen model with adapters still back-propagates. It is a
        hook on the word-embedding module, so the embedding then runs as modules (see
        ``fastbert.modeling.plain``)."""
        def require_grad(module, args, output):
            output.requires_grad_(True)

        self.disable_input_require_grads()
        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(require_grad)

    def disable_input_require_grads(self) -> None:
        hook = getattr(self, "_require_grads_hook", None)
        if hook is not None:
            hook.remove()
            self._require_grads_hook = None

    # -- vocabulary -----------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix, self)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.base_model.embeddings.word_embeddings = value

    def get_output_embeddings(self) -> Optional[nn.Linear]:
        """The decoder onto the vocabulary, for heads that have one."""
        return None

    def resize_token_embeddings(self, new_num_tokens: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Grow or shrink the vocabulary to ``new_num_tokens`` rows (rounded up to a multiple
        of ``pad_to_multiple_of``), as Hugging Face's method does: rows are added or removed
        at the end, the others kept; ``config.vocab_size``, the MLM decoder and its bias
        follow, and the decoder stays tied to the word embeddings. Added rows are the old
        rows' mean (``mean_resizing``, with HF's 1e-9-scaled covariance noise) or drawn as
        at initialisation. With neither argument it returns the embeddings unchanged."""
        old = self.get_input_embeddings()
        count = resized_vocab(old.num_embeddings, new_num_tokens, pad_to_multiple_of)
        if count is None:
            return old
        pad = self.config.pad_token_id
        if pad is not None and not 0 <= pad < count:
            raise ValueError(f"resize_token_embeddings({count}) would drop the padding row pad_token_id={pad}")
        if count != old.num_embeddings:
            new = nn.Embedding(count, old.embedding_dim, padding_idx=old.padding_idx,
                               device=old.weight.device, dtype=old.weight.dtype)
            self._init_weights(new)
            with torch.no_grad():
                new.weight.copy_(resized_rows(old.weight, new.weight, mean_resizing))
            new.weight.requires_grad_(old.weight.requires_grad)
            self.set_input_embeddings(new)
            self._resize_output(count, mean_resizing)
        self.config.vocab_size = count
        self.tie_weights()
        return self.get_input_embeddings()

    def _resize_output(self, count: int, mean_resizing: bool) -> None:
        """Resize the heads' vocabulary-sized parameters (none here)."""

    # -- checkpoints ----------------------------------------------------------------------
    def _convert_keys(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Map a checkpoint's keys onto this model's: legacy gamma/beta names, and a
        ``bert.`` prefix added or removed as the model and the checkpoint need."""
        own = self.state_dict().keys()
        has_prefix = any(k.startswith(self.base_model_prefix + ".") for k in own)
        out = {}
        for key, value in state.items():
            key = _legacy_name(key)
            if key.startswith("bert.") and not has_prefix:
                key = key[len("bert."):]
            elif has_prefix and not key.startswith("bert.") and f"bert.{key}" in own:
                key = f"bert.{key}"
            if key.split("bert.")[-1] in _IGNORED:
                continue
            out[key] = value
        return out

    def load_checkpoint_state(self, state: Dict[str, torch.Tensor], strict: bool = False) -> None:
        """Load a checkpoint's tensors, checking them all first.

        Mis-shaped keys, and missing or unexpected keys of the encoder, raise a
        :class:`CheckpointError` naming every one of them. A missing head (a fresh
        classifier on a pre-trained encoder) is initialised and warned about, and another
        head's weights are dropped, as Hugging Face does, unless ``strict``.
        """
        state = self._convert_keys(state)
        own = self.state_dict()
        tied = self._tied_keys()
        missing = [k for k in own if k not in state and k not in tied]
        unexpected = [k for k in state if k not in own]
        misshaped = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
                     for k in state if k in own and state[k].shape != own[k].shape]

        def is_head(k):  # a head's key, or the pooler's (which some heads leave out)
            return k.removeprefix("bert.").startswith(_OTHER_HEADS)
        fatal_missing = missing if strict else [k for k in missing if not is_head(k)]
        fatal_unexpected = unexpected if strict else [k for k in unexpected if not is_head(k)]
        problems = []
        if misshaped:
            problems.append("mis-shaped: " + "; ".join(misshaped))
        if fatal_missing:
            problems.append("missing: " + ", ".join(fatal_missing))
        if fatal_unexpected:
            problems.append("unexpected: " + ", ".join(fatal_unexpected))
        if problems:
            raise CheckpointError(f"the checkpoint does not fit {type(self).__name__}: " + " | ".join(problems))
        head_missing = [k for k in missing if k not in fatal_missing]
        if head_missing:
            warnings.warn(f"{type(self).__name__}: newly initialised (not in the checkpoint): {', '.join(head_missing)}")
        dropped = [k for k in unexpected if k not in fatal_unexpected]
        if dropped:
            warnings.warn(f"{type(self).__name__}: checkpoint weights not used (another head): {', '.join(dropped)}")
        with torch.no_grad():
            for key, value in state.items():
                if key in own:
                    own[key].copy_(value)
        self.tie_weights()

    def _tied_keys(self) -> set:
        """Keys whose tensor is another key's (the decoder tied to the word embeddings and to
        the prediction bias): a checkpoint need not carry them, as HF does not save them."""
        first, tied = {}, set()
        for key, value in self.state_dict(keep_vars=True).items():
            if id(value) in first:
                tied.add(key if key.startswith("cls.") else first[id(value)])
            else:
                first[id(value)] = key
        return tied

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], *model_args, dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device, None] = None, config: Optional[BertConfig] = None,
                        strict: bool = False, **kwargs):
        """A model from a local directory (config.json + weights) or a weights file.

        ``dtype`` and ``device`` place the loaded model (``torch_dtype`` and a single-device
        ``device_map`` are accepted too); ``subfolder`` is joined to ``path``; Hugging Face's
        download and loading options that mean nothing for a local checkpoint (``revision``,
        ``attn_implementation``…) are accepted and ignored, not written into the config;
        other keyword arguments override config fields (``num_labels=3``…).
        """
        dtype = kwargs.pop("torch_dtype", dtype)
        device = _device_from_map(kwargs.pop("device_map", None), device)
        path = os.fspath(path)
        subfolder = kwargs.pop("subfolder", None)
        if subfolder:
            path = os.path.join(path, subfolder)
        for key in HUB_LOADING_KWARGS:
            kwargs.pop(key, None)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no checkpoint at {path}: fastbert loads a local directory (config.json and the "
                                    "weights) or a weights file; fetch a Hub model first (huggingface_hub.snapshot_download)")
        if config is None:
            config_dir = path if os.path.isdir(path) else os.path.dirname(path) or "."
            config = BertConfig.from_pretrained(config_dir)
        for key, value in kwargs.items():
            setattr(config, key, value)
        config.validate()
        state = read_state_dict(path)
        dtype = _resolve_dtype(dtype, config, state)
        model = cls(config, *model_args)
        model.load_checkpoint_state(state, strict=strict)
        model.eval()
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        return model

    def save_pretrained(self, save_directory: Union[str, os.PathLike], is_main_process: bool = True,
                        state_dict: Optional[Dict[str, torch.Tensor]] = None, max_shard_size: Union[int, str] = "50GB",
                        safe_serialization: bool = True, **kwargs) -> None:
        """config.json + model.safetensors, in the form ``transformers`` loads, with HF's
        options: only the main process writes (``is_main_process``); ``state_dict`` replaces
        the model's own tensors; past ``max_shard_size`` ("5GB", "500MB" or bytes) the
        weights go in numbered shards and an index; ``safe_serialization=False`` writes
        pytorch_model.bin. Files of an earlier save in the directory are replaced."""
        if kwargs.pop("push_to_hub", False):
            raise ValueError("fastbert saves to local directories only: push_to_hub is not supported")
        unknown = set(kwargs) - {"token", "save_peft_format", "save_original_format", "distributed_checkpoint"}
        if unknown or kwargs.get("distributed_checkpoint"):
            raise TypeError(f"save_pretrained: unsupported arguments {sorted(unknown or ['distributed_checkpoint'])}")
        shard_bytes(max_shard_size)  # a bad size fails before anything is written
        if not is_main_process:
            return
        directory = os.fspath(save_directory)
        if os.path.isfile(directory):
            raise ValueError(f"save_pretrained needs a directory, and {directory} is a file")
        os.makedirs(directory, exist_ok=True)
        self.config.architectures = [type(self).__name__]
        self.config.dtype = str(self.dtype).replace("torch.", "")
        self.config.save_pretrained(directory)
        seen, state = set(), {}
        for key, value in (self.state_dict() if state_dict is None else state_dict).items():
            if value.data_ptr() in seen and key.startswith("cls.predictions.decoder."):
                continue  # tied to the word embeddings / the prediction bias; HF re-ties on load
            seen.add(value.data_ptr())
            state[key] = value.detach().contiguous().cpu()
        write_state_dict(state, directory, max_shard_size, safe=safe_serialization)
