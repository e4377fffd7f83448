"""fastbert: a faster BERT for PyTorch, built from fused Triton kernels and a CUDA C++
embedding kernel, behind Hugging Face's BERT API."""

from . import functional
from .backend import assume_valid_ids, get_backend, set_backend, use_backend
from .config import BertConfig
from .cuda_graphs import CUDAGraphRunner
from .heads import (BertForMaskedLM, BertForMultipleChoice, BertForNextSentencePrediction, BertForPreTraining,
                    BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification)
from .modeling import BertModel
from .optimize import optimize
from .pretrained import BertPreTrainedModel, CheckpointError
from .tokenizer import BertTokenizer

__version__ = "0.1.0"

__all__ = [
    "BertConfig", "BertModel", "BertPreTrainedModel", "BertForPreTraining", "BertForMaskedLM",
    "BertForNextSentencePrediction", "BertForSequenceClassification", "BertForTokenClassification",
    "BertForQuestionAnswering", "BertForMultipleChoice", "CheckpointError", "functional",
    "CUDAGraphRunner", "get_backend", "set_backend", "use_backend", "assume_valid_ids", "BertTokenizer", "optimize",
]
