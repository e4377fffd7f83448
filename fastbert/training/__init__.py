"""Pre-training (masked LM + next sentence prediction) from plain text: examples
(:mod:`.data`), the masking collator (:mod:`.collator`), the loop (:mod:`.trainer`) and
``fastbert pretrain`` / :func:`pretrain` (:mod:`.cli`)."""

from .cli import MODEL_SIZES, model_config, pretrain
from .collator import MLMCollator
from .data import Example, PretrainingDataset, create_examples, read_documents, tokenize_documents, train_tokenizer
from .trainer import PreTrainingObjective, Trainer, TrainingArguments, init_distributed, linear_schedule, parameter_groups

__all__ = [
    "MODEL_SIZES", "model_config", "pretrain", "MLMCollator", "Example", "PretrainingDataset", "create_examples",
    "read_documents", "tokenize_documents", "train_tokenizer", "PreTrainingObjective", "Trainer",
    "TrainingArguments", "init_distributed", "linear_schedule", "parameter_groups",
]
