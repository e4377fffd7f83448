"""The pre-training loop: AdamW with linear warm-up and decay, gradient clipping and
accumulation, bf16 autocast on the GPU, a progress bar, checkpoints in Hugging Face's format
with everything needed to resume, and data parallelism through ``torchrun`` and
``DistributedDataParallel``.

The loss of one optimizer step is the mean over every masked token (and every example, for
next sentence prediction) in the step's whole batch: across accumulation micro-batches and
across processes. So N processes, or N accumulated micro-batches, take exactly the step one
process would take on the combined batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..backend import assume_valid_ids
from ..cuda_graphs import capture_layout
from ..padding import Packing, unpad_mask
from ..pretrained import read_state_dict

TRAINER_STATE = "trainer_state.pt"
# Arguments that fix the data order: a resumed run must keep them.
_ORDER_ARGS = ("batch_size", "gradient_accumulation_steps", "seed")
LOG_FILE = "log.jsonl"


@dataclass
class TrainingArguments:
    output_dir: str
    max_steps: int = 1000
    batch_size: int = 32  # examples per process per micro-batch
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-6
    warmup_steps: int = 0
    max_grad_norm: Optional[float] = 1.0  # None or 0: no clipping
    bf16: Optional[bool] = None  # None: on for CUDA, off for CPU
    seed: int = 42
    save_steps: int = 0  # 0: save only at the end
    logging_steps: int = 10
    num_workers: int = 0
    progress: bool = True
    device: Optional[str] = None  # None: this process's GPU if there is one, else the CPU

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "logging_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_steps", "num_workers"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive and finite, got {self.learning_rate}")
        for name in ("weight_decay", "adam_epsilon"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0 and finite, got {value}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be >= 0 (0 or None: no clipping), got {self.max_grad_norm}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError(f"adam betas must lie in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        if self.warmup_steps > self.max_steps:
            warnings.warn(f"warmup_steps={self.warmup_steps} is more than max_steps={self.max_steps}: "
                          "the learning rate never reaches its peak")


def init_distributed(device: Optional[str] = None) -> tuple:
    """(rank, world size, device) for this process. Under ``torchrun`` (WORLD_SIZE > 1) it
    joins the process group: NCCL when training on GPUs, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a device torch knows ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: this torch sees no CUDA GPU")
    if device.type == "cuda":
        if device.index is None:  # "cuda": this process's GPU (set_device and the RNG calls need an index)
            device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


class PreTrainingObjective(nn.Module):
    """Sums of the masked-LM and next-sentence losses of a batch for a ``BertForPreTraining``
    (fastbert's or Hugging Face's). Only the masked positions go through the vocabulary
    projection, which is most of the head's cost. This module, not the model, is what
    DistributedDataParallel wraps, so its forward is what synchronises gradients."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, token_type_ids, attention_mask, labels, next_sentence_label, masked=None):
        """``masked``: the flat indices of the labelled tokens, when the caller has them (the
        trainer computes them on the host, which spares the device a boolean-mask sync)."""
        out = self.model.bert(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                              return_dict=True)
        if masked is None:
            masked = (labels.reshape(-1) != -100).nonzero().squeeze(1)
        hidden = out.last_hidden_state.flatten(0, 1).index_select(0, masked)
        logits = self.model.cls.predictions(hidden)
        mlm = F.cross_entropy(logits.float(), labels.reshape(-1).index_select(0, masked), reduction="sum")
        relationship = self.model.cls.seq_relationship(out.pooler_output)
        nsp = F.cross_entropy(relationship.float(), next_sentence_label, reduction="sum")
        return mlm, nsp


def parameter_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """AdamW groups: biases and LayerNorm weights are not decayed (BERT's recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to the peak over ``warmup_steps``, then linear decay to 0: the
    factor of optimizer step ``step`` (from 0) is transformers' ``get_linear_schedule_with_warmup``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Skip(torch.utils.data.Sampler):
    """The sampler's order for this epoch, from ``start`` on (to resume mid-epoch)."""

    def __init__(self, sampler: DistributedSampler, start: int):
        self.indices = list(sampler)[start:]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class Trainer:
    """Pre-trains a ``BertForPreTraining`` on a dataset of examples batched by a collator
    (see :mod:`fastbert.training.data` and :mod:`fastbert.training.collator`).

    Run it in one process, or under ``torchrun --nproc_per_node N``: each process then
    trains on its shard of every batch, rank 0 logs and writes checkpoints.
    """

    def __init__(self, model: nn.Module, dataset, collator, args: TrainingArguments, tokenizer=None):
        self.args = args
        self.rank, self.world_size, self.device = init_distributed(args.device)
        self.model = model.to(self.device)
        self.model.train()
        self.dataset, self.collator, self.tokenizer = dataset, collator, tokenizer
        self.bf16 = self.device.type == "cuda" if args.bf16 is None else bool(args.bf16)
        objective = PreTrainingObjective(self.model)
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids)
        self.objective = objective
        # On a GPU the fused AdamW: a few multi-tensor kernels per step rather than one per tensor op.
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, args.weight_decay), lr=args.learning_rate,
                                           betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                                           fused=self.device.type == "cuda" or None)
        self.scheduler = linear_schedule(self.optimizer, args.warmup_steps, args.max_steps)
        self.sampler = DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                          seed=args.seed, drop_last=False)
        self.micro_per_epoch = len(self.sampler) // args.batch_size
        self.steps_per_epoch = self.micro_per_epoch // args.gradient_accumulation_steps
        if self.steps_per_epoch < 1:
            raise ValueError(f"an epoch has {len(self.sampler)} examples per process, fewer than one step's "
                             f"{args.batch_size} x {args.gradient_accumulation_steps}; use a smaller batch")
        self.step = 0
        self.history: List[Dict] = []
        torch.manual_seed(args.seed + self.rank)  # dropout: its own stream per process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- data ---------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[Dict[str, torch.Tensor]]:
        """Micro-batches from the current step on, epoch after epoch."""
        epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
        skip = step_in_epoch * self.args.gradient_accumulation_steps * self.args.batch_size
        while True:
            self.sampler.set_epoch(epoch)
            self.collator.set_epoch(epoch)
            loader = DataLoader(self.dataset, batch_size=self.args.batch_size, sampler=_Skip(self.sampler, skip),
                                collate_fn=self.collator, drop_last=True, num_workers=self.args.num_workers,
                                pin_memory=self.device.type == "cuda",
                                generator=torch.Generator())  # keeps the global RNG (dropout) untouched
            usable = self.steps_per_epoch * self.args.gradient_accumulation_steps - skip // self.args.batch_size
            for k, batch in enumerate(loader):
                if k >= usable:
                    break
                yield batch
            epoch, skip = epoch + 1, 0

    # -- one optimizer step -------------------------------------------------------------
    def _train_step(self, micro: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
        # Nothing in a step reads the GPU back: counts, ids and the packing of the real tokens
        # are worked out on the host, where the batches come from, and copied without waiting.
        local = torch.tensor([float(sum(int((m["labels"] != -100).sum()) for m in micro)),
                              float(sum(len(m["next_sentence_label"]) for m in micro))])
        local = local.to(self.device, non_blocking=True)
        counts = local.clone()  # masked tokens and sequences of the whole step
        if self.world_size > 1:
            dist.all_reduce(counts)
        # DDP averages gradients over processes; scaling by the world size makes the result
        # the gradient of the mean over the whole step's batch.
        scale = self.world_size / counts.clamp(min=1)
        logged = torch.zeros(3, device=self.device)
        for k, batch in enumerate(micro):
            self._check_ids(batch)
            packing = self._packing(batch["attention_mask"])
            padded = packing is not None
            layout = capture_layout(self.model, packing) if padded else contextlib.nullcontext()
            batch = dict(batch, masked=(batch["labels"].reshape(-1) != -100).nonzero().squeeze(1))
            batch = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
            last = k == len(micro) - 1
            sync = self.objective.no_sync() if self.world_size > 1 and not last else contextlib.nullcontext()
            with sync, layout, assume_valid_ids():
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    mlm, nsp = self.objective(batch["input_ids"], batch["token_type_ids"],
                                              batch["attention_mask"] if padded else None,
                                              batch["labels"], batch["next_sentence_label"], batch["masked"])
                (mlm * scale[0] + nsp * scale[1]).backward()
            logged += torch.stack([mlm.detach() / counts[0].clamp(min=1), nsp.detach() / counts[1].clamp(min=1),
                                   batch["attention_mask"].sum().float()])
        if self.args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.cat([logged, local])

    def _check_ids(self, batch: Dict[str, torch.Tensor]) -> None:
        """The checks the embedding would make on the GPU, made on the host batch (so the
        forward can skip them: :func:`fastbert.assume_valid_ids`)."""
        config = self.model.config
        ids = batch["input_ids"]
        if ids.shape[-1] > config.max_position_embeddings:
            raise ValueError(f"sequence length {ids.shape[-1]} is longer than max_position_embeddings "
                             f"({config.max_position_embeddings})")
        for name, t, rows in (("input_ids", ids, config.vocab_size),
                              ("token_type_ids", batch.get("token_type_ids"), config.type_vocab_size)):
            if t is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= rows):
                bad = int(t[(t < 0) | (t >= rows)][0])
                raise ValueError(f"{name} contains {bad}, outside the model's range [0, {rows})")

    def _packing(self, mask: torch.Tensor) -> Optional[Packing]:
        """The packing of a batch's real tokens, from its host mask, on the device; None
        without padding."""
        p = unpad_mask(mask)
        if p is None:
            return None
        return Packing(p.indices.to(self.device, non_blocking=True), p.cu_seqlens.to(self.device, non_blocking=True),
                       p.max_seqlen, p.batch, p.seqlen)

    # -- the loop -----------------------------------------------------------------------
    def train(self, resume_from: Optional[str] = None) -> List[Dict]:
        """Train up to ``args.max_steps``; returns the per-step log (loss, mlm_loss,
        nsp_loss, lr, and the step's real tokens, masked tokens and sequences over all
        processes), continued from the checkpoint when resuming."""
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        args = self.args
        pending: List[tuple] = []  # (step, lr, logged tensor): reduced at logging time, not every step
        batches = self._micro_batches()
        bar = None
        if args.progress and self.is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=args.max_steps, initial=self.step, desc="pretrain", dynamic_ncols=True)
        timer = time.perf_counter()
        while self.step < args.max_steps:
            micro = [next(batches) for _ in range(args.gradient_accumulation_steps)]
            lr = self.scheduler.get_last_lr()[0]
            pending.append((self.step + 1, lr, self._train_step(micro)))
            self.step += 1
            if bar is not None:
                bar.update(1)
            done = self.step == args.max_steps
            if self.step % args.logging_steps == 0 or done or (args.save_steps and self.step % args.save_steps == 0):
                records = self._reduce_logs(pending)
                pending = []
                elapsed, timer = time.perf_counter() - timer, time.perf_counter()
                rate = sum(r["tokens"] for r in records) / max(elapsed, 1e-9)
                if bar is not None:
                    bar.set_postfix(loss=f"{records[-1]['loss']:.4f}", tok_s=f"{rate:,.0f}")
                if self.is_main:
                    self._append_log(records, rate)
            if args.save_steps and self.step % args.save_steps == 0 and not done:
                self.save_checkpoint(os.path.join(args.output_dir, f"checkpoint-{self.step}"))
        if bar is not None:
            bar.close()
        self.save_checkpoint(args.output_dir)
        return self.history

    def _reduce_logs(self, pending) -> List[Dict]:
        if not pending:
            return []
        values = torch.stack([p[2] for p in pending])
        if self.world_size > 1:
            dist.all_reduce(values)
        records = []
        for (step, lr, _), (mlm, nsp, tokens, masked, sequences) in zip(pending, values.tolist()):
            if not math.isfinite(mlm + nsp):
                raise FloatingPointError(f"the loss is {mlm + nsp} at step {step} (learning rate {lr:.3g}): training "
                                         "diverged; lower the learning rate or clip gradients (max_grad_norm)")
            records.append(dict(step=step, loss=mlm + nsp, mlm_loss=mlm, nsp_loss=nsp, lr=lr, tokens=int(tokens),
                                masked=int(masked), sequences=int(sequences)))
        self.history.extend(records)
        return records

    def _append_log(self, records, rate) -> None:
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, LOG_FILE), "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps({**r, "tokens_per_s": round(rate, 1)}) + "\n")

    # -- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self, directory: str) -> None:
        """The model (config.json + model.safetensors, loadable by ``transformers``), the
        tokenizer, and ``trainer_state.pt`` (optimizer, schedule, step, log); each process
        adds its own RNG state."""
        if self.is_main:
            self.model.save_pretrained(directory)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(directory)
            torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "history": self.history,
                        "args": dataclasses.asdict(self.args), "world_size": self.world_size,
                        "data": self._data_settings()},
                       os.path.join(directory, TRAINER_STATE))
        if self.world_size > 1:
            dist.barrier()  # the directory exists before the other ranks write into it
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        os.makedirs(directory, exist_ok=True)
        torch.save(rng, os.path.join(directory, f"rng_state_{self.rank}.pt"))
        if self.world_size > 1:
            dist.barrier()

    def _data_settings(self) -> Dict:
        """What fixes the order and content of the batches, beyond the arguments in _ORDER_ARGS."""
        settings = {"examples": len(self.dataset)}
        if hasattr(self.dataset, "num_tokens"):
            settings["tokens"] = int(self.dataset.num_tokens())
        if hasattr(self.collator, "mlm_probability"):
            settings["mlm_probability"] = float(self.collator.mlm_probability)
        return settings

    def load_checkpoint(self, directory: str) -> None:
        """Continue from a checkpoint written by :meth:`save_checkpoint`."""
        state_file = os.path.join(directory, TRAINER_STATE)
        if not os.path.isfile(state_file):
            raise FileNotFoundError(f"{directory} is not a training checkpoint (no {TRAINER_STATE})")
        self.model.load_checkpoint_state(read_state_dict(directory), strict=True)
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        if state["world_size"] != self.world_size:
            raise ValueError(f"the checkpoint was written by {state['world_size']} processes, this run has "
                             f"{self.world_size}: the data order would not continue")
        saved = {**{k: state["args"].get(k) for k in _ORDER_ARGS}, **state.get("data", {})}
        now = {**{k: getattr(self.args, k) for k in _ORDER_ARGS}, **self._data_settings()}
        changed = [f"{k} {saved[k]} -> {now[k]}" for k in now if k in saved and saved[k] != now[k]]
        if changed:
            raise ValueError(f"the checkpoint's run had other data or batch settings ({'; '.join(changed)}): "
                             "resuming would not continue its data order")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        rng_file = os.path.join(directory, f"rng_state_{self.rank}.pt")
        if os.path.isfile(rng_file):
            rng = torch.load(rng_file, map_location="cpu", weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        else:
            warnings.warn(f"{rng_file} is missing: dropout will not continue the checkpointed run's random stream")
        log = os.path.join(self.args.output_dir, LOG_FILE)
        if self.is_main and os.path.isfile(log):
            # Steps logged after the checkpoint are about to be run again: drop them.
            with open(log, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= self.step]
            with open(log, "w", encoding="utf-8") as f:
                f.writelines(kept)
        if self.step >= self.args.max_steps and self.is_main:
            print(f"fastbert pretrain: the checkpoint is at step {self.step}, already at max_steps={self.args.max_steps}")
