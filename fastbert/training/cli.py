"""``fastbert pretrain`` and its Python equivalent :func:`pretrain`: BERT pre-training
(masked LM + next sentence prediction) from plain text.

One process::

    fastbert pretrain --config tiny --tokenizer TOKDIR --corpus corpus.txt --output-dir out

Data parallel on 8 GPUs (or processes on the CPU, with gloo)::

    torchrun --nproc_per_node 8 -m fastbert pretrain --config base ...
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional, Sequence, Union

import torch

from ..config import BertConfig
from .collator import MLMCollator
from .data import PretrainingDataset
from .trainer import Trainer, TrainingArguments

# The standard BERT sizes (the paper's base and large, and Turc et al.'s smaller models).
MODEL_SIZES: Dict[str, Dict[str, int]] = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4),
    "small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8),
    "medium": dict(num_hidden_layers=8, hidden_size=512, num_attention_heads=8),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12),
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16),
}


def model_config(name_or_path: Union[str, os.PathLike, BertConfig], vocab_size: Optional[int] = None,
                 **overrides) -> BertConfig:
    """A BertConfig from a size name (tiny, mini, small, medium, base, large), a config.json
    or a directory holding one. ``vocab_size`` is set to the tokenizer's."""
    if isinstance(name_or_path, BertConfig):
        config = BertConfig.from_dict(name_or_path.to_dict())
    elif str(name_or_path) in MODEL_SIZES:
        size = MODEL_SIZES[str(name_or_path)]
        config = BertConfig(**size, intermediate_size=4 * size["hidden_size"])
    elif os.path.exists(name_or_path):
        config = BertConfig.from_pretrained(name_or_path)
    else:
        raise ValueError(f"config {name_or_path!r} is neither a size ({', '.join(MODEL_SIZES)}) nor a config.json")
    if vocab_size is not None:
        config.vocab_size = int(vocab_size)
    for key, value in overrides.items():
        setattr(config, key, value)
    config.validate()
    return config


def pretrain(corpus: Union[str, Sequence[str]], tokenizer, output_dir: str, config=None, *,
             max_seq_length: int = 128, short_seq_prob: float = 0.1, dupe_factor: int = 1,
             mlm_probability: float = 0.15, init_from: Optional[str] = None, resume: Optional[str] = None,
             backend: Optional[str] = None, **training) -> tuple:
    """Pre-train a BertForPreTraining; returns ``(model, history)``.

    ``tokenizer``: a :class:`fastbert.BertTokenizer` or a directory for one. ``config``: a
    size name, a config.json or a BertConfig (default: ``init_from``'s config, else "tiny").
    ``init_from``: start from a checkpoint's weights. ``resume``: continue a run from a checkpoint directory. Other keyword arguments
    are :class:`~fastbert.training.trainer.TrainingArguments` fields (``max_steps``,
    ``batch_size``, ``learning_rate``…).
    """
    from .. import backend as _backend
    from ..heads import BertForPreTraining
    from ..tokenizer import BertTokenizer

    if os.path.isfile(output_dir):
        raise ValueError(f"output_dir {output_dir} is a file; checkpoints need a directory")
    if resume is not None and not os.path.isdir(resume):
        raise FileNotFoundError(f"no checkpoint directory at {resume} to resume from")
    if not isinstance(tokenizer, BertTokenizer):
        tokenizer = BertTokenizer.from_pretrained(tokenizer)
    args = TrainingArguments(output_dir=output_dir, **training)
    if config is None:
        config = init_from if init_from is not None else "tiny"
    if backend is not None:
        _backend.set_backend(backend)
    config = model_config(config, vocab_size=len(tokenizer))
    if max_seq_length > config.max_position_embeddings:
        raise ValueError(f"max_seq_length {max_seq_length} exceeds max_position_embeddings {config.max_position_embeddings}")
    torch.manual_seed(args.seed)  # the same initial weights in every process
    if init_from is not None:
        model = BertForPreTraining.from_pretrained(init_from, config=config)
    else:
        model = BertForPreTraining(config)
    dataset = PretrainingDataset.from_corpus(corpus, tokenizer, max_seq_length=max_seq_length,
                                             short_seq_prob=short_seq_prob, dupe_factor=dupe_factor, seed=args.seed)
    collator = MLMCollator(tokenizer, mlm_probability=mlm_probability, seed=args.seed)
    trainer = Trainer(model, dataset, collator, args, tokenizer=tokenizer)
    if trainer.is_main:
        print(f"fastbert pretrain: {model.num_parameters():,} parameters, {len(dataset):,} examples "
              f"({dataset.num_tokens():,} tokens, B from another document in {dataset.random_next_share():.0%}), "
              f"{trainer.world_size} process(es) on {trainer.device}, "
              f"bf16 {'on' if trainer.bf16 else 'off'}", file=sys.stderr)
    history = trainer.train(resume_from=resume)
    return model, history


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainingArguments(output_dir="")
    p = parser.add_argument
    p("--config", default=None, help=f"model size ({', '.join(MODEL_SIZES)}) or a config.json "
      "(default: --init-from's config, else tiny)")
    p("--tokenizer", required=True, help="directory with tokenizer.json or vocab.txt, or a vocab file")
    p("--corpus", required=True, nargs="+", help="text files: one sentence per line, blank line between documents")
    p("--output-dir", required=True, help="where checkpoints and the final model go")
    p("--max-seq-length", type=int, default=128)
    p("--short-seq-prob", type=float, default=0.1,
      help="chance that a document's examples get a shorter random length (BERT's create_pretraining_data)")
    p("--dupe-factor", type=int, default=1, help="passes over the corpus with different pairings")
    p("--mlm-probability", type=float, default=0.15)
    p("--max-steps", type=int, default=d.max_steps)
    p("--batch-size", type=int, default=d.batch_size, help="examples per process per micro-batch")
    p("--grad-accum", type=int, default=d.gradient_accumulation_steps, help="micro-batches per optimizer step")
    p("--lr", type=float, default=d.learning_rate)
    p("--weight-decay", type=float, default=d.weight_decay)
    p("--adam-epsilon", type=float, default=d.adam_epsilon)
    p("--warmup-steps", type=int, default=d.warmup_steps)
    p("--max-grad-norm", type=float, default=d.max_grad_norm, help="0: no clipping")
    p("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on for CUDA)")
    p("--seed", type=int, default=d.seed)
    p("--save-steps", type=int, default=d.save_steps, help="checkpoint every N steps (0: only at the end)")
    p("--logging-steps", type=int, default=d.logging_steps)
    p("--num-workers", type=int, default=d.num_workers, help="DataLoader worker processes")
    p("--device", default=None, help="default: this process's GPU if there is one, else cpu")
    p("--backend", choices=("auto", "triton", "eager"), default=None, help="fastbert kernels to use")
    p("--init-from", default=None, help="start from this checkpoint's weights")
    p("--resume", default=None, metavar="DIR", help="continue from a checkpoint directory")
    p("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    training = dict(max_steps=args.max_steps, batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
                    learning_rate=args.lr, weight_decay=args.weight_decay, adam_epsilon=args.adam_epsilon,
                    warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm, bf16=args.bf16, seed=args.seed,
                    save_steps=args.save_steps, logging_steps=args.logging_steps, num_workers=args.num_workers,
                    progress=not args.no_progress, device=args.device)
    try:
        _, history = pretrain(args.corpus, args.tokenizer, args.output_dir, args.config,
                              max_seq_length=args.max_seq_length, short_seq_prob=args.short_seq_prob,
                              dupe_factor=args.dupe_factor, mlm_probability=args.mlm_probability,
                              init_from=args.init_from, resume=args.resume, backend=args.backend, **training)
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        print(f"fastbert pretrain: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if history and int(os.environ.get("RANK", "0")) == 0:
        last = history[-1]
        print(f"fastbert pretrain: step {last['step']}: loss {last['loss']:.4f} (mlm {last['mlm_loss']:.4f}, "
              f"nsp {last['nsp_loss']:.4f}); model saved to {args.output_dir}", file=sys.stderr)
    return 0
