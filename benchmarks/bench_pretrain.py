"""A short real pre-training run: tokens per second of the whole loop, not of one step.

Text from a corpus goes through a WordPiece tokenizer learned from it, sentence-pair
examples with NSP labels, the MLM collator, and :class:`fastbert.training.Trainer` (AdamW
with warm-up and decay, gradient clipping, bf16 autocast on a GPU, dropout on), as
``fastbert pretrain`` runs them. The same loop trains Hugging Face's BertForPreTraining
(sdpa attention) from the same weights on the same batches, so the two rates compare the
models and nothing else. The model keeps the workload's vocabulary (BERT's 30522 for
BERT-base) whatever the tokenizer's size, so the vocabulary projection costs what it
costs in BERT.

The first logging window (compilation, autotuning, allocator warm-up) is not counted;
each window ends with the loop's own read of its losses, so its wall time covers the GPU
work of its steps. The final checkpoint is written after the last window, outside the
timing.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from typing import Dict, List

import torch

from . import competitors as C
from .common import Measurement
from .workloads import CONFIGS, Workload

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "corpus.txt")
TOKENIZER_VOCAB = 2000  # the corpus is small: a larger WordPiece vocabulary would be mostly unused


def schedule(quick: bool, on_gpu: bool) -> Dict[str, int]:
    """Steps per logging window and windows run (the first is warm-up)."""
    if not on_gpu:
        return {"window": 2, "windows": 3}
    return {"window": 10, "windows": 2 if quick else 6}


def pretrain_flops(cfg: Dict[str, int], records: List[Dict]) -> float:
    """FLOPs of the logged steps, as the training objective does them: the encoder on the
    real tokens (attention from each step's mean sequence length), the pooler and NSP per
    sequence, the MLM transform and vocabulary projection on the masked tokens only;
    backward counted as twice forward."""
    h, i, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    total = 0.0
    for r in records:
        tokens, sequences, masked = r["tokens"], max(r["sequences"], 1), r["masked"]
        mean_len = tokens / sequences
        total += 2 * layers * (4 * h * h + 2 * h * i) * tokens + 4 * mean_len * mean_len * h * layers * sequences
        total += (2 * h * h + 2 * 2 * h) * sequences + 2 * (h * h + h * vocab) * masked
    return 3 * total


def measure(w: Workload, impl: str, device: str, quick: bool, cache: C.ModelCache) -> Measurement:
    """Run the loop for ``impl`` ("fastbert" or "hf-sdpa") and time its windows after the first."""
    from fastbert.training import MLMCollator, PretrainingDataset, Trainer, TrainingArguments, train_tokenizer

    if not os.path.isfile(CORPUS):
        raise FileNotFoundError(f"the corpus {CORPUS} is missing (run from a checkout of the repository)")
    family = C.IMPLS[impl][0]
    # A copy: training changes the weights that the other workloads share.
    model = copy.deepcopy(cache.get(w, family, torch.float32))
    on_gpu = str(device).startswith("cuda")
    plan = schedule(quick, on_gpu)
    cfg = CONFIGS[w.model]
    with tempfile.TemporaryDirectory(prefix="fastbert-pretrain-") as tmp:
        tokenizer = train_tokenizer(CORPUS, os.path.join(tmp, "tokenizer"), vocab_size=min(TOKENIZER_VOCAB, cfg["vocab_size"]))
        dataset = PretrainingDataset.from_corpus(CORPUS, tokenizer, max_seq_length=w.seqlen, dupe_factor=5, seed=0)
        args = TrainingArguments(output_dir=os.path.join(tmp, "run"), max_steps=plan["window"] * plan["windows"],
                                 batch_size=w.batch, warmup_steps=plan["window"], logging_steps=plan["window"],
                                 learning_rate=1e-4, progress=False, device=device, seed=0)
        trainer = Trainer(model, dataset, MLMCollator(tokenizer, seed=0), args, tokenizer=tokenizer)
        trainer.train()
        with open(os.path.join(args.output_dir, "log.jsonl"), encoding="utf-8") as f:
            log = [json.loads(line) for line in f if line.strip()]
    del trainer, model
    if on_gpu:
        torch.cuda.empty_cache()
    timed = [r for r in log if r["step"] > plan["window"]]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)  # each record's share of its window
    tokens = sum(r["tokens"] for r in timed)
    ms = 1e3 * seconds / len(timed)
    extra: Dict[str, object] = {
        "workload": w.key, "tokens_per_s": tokens / seconds, "steps_timed": len(timed), "steps": len(log),
        "real_tokens_per_step": tokens / len(timed), "masked_per_step": sum(r["masked"] for r in timed) / len(timed),
        "loss_first": log[0]["loss"], "loss_last": log[-1]["loss"], "vocab": len(tokenizer),
        "gflop": pretrain_flops(cfg, timed) / len(timed) / 1e9,
    }
    case = (f"{'bf16 autocast' if on_gpu else 'fp32'} B={w.batch} S<={w.seqlen} AdamW, "
            f"{plan['window'] * (plan['windows'] - 1)} timed steps")
    tflops = extra["gflop"] / ms  # GFLOP per ms = TFLOP/s
    return Measurement("model", w.title, case, impl, "train", ms, tflops=tflops, extra=extra)
