"""BERT with heads: pre-training (masked LM + next sentence prediction) and fine-tuning
(sequence classification, token classification, question answering, multiple choice).
Names, arguments, outputs and losses are Hugging Face's.

Per-token outputs (``logits``, ``prediction_logits``, ``start_logits``…) at padded
positions come from the zero hidden states the unpadded encoder leaves there (see
:class:`fastbert.BertModel`), where Hugging Face computes them. Losses are HF's: where one
reads padded positions (question answering's, which normalises over every position, or a
per-token loss with labels other than -100 at padding) the encoder runs padded for that
call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import BertConfig
from .modeling import BertModel, _capturing, _tracing, dense_activation
from .outputs import (BertForPreTrainingOutput, MaskedLMOutput, MultipleChoiceModelOutput,
                      NextSentencePredictorOutput, QuestionAnsweringModelOutput,
                      SequenceClassifierOutput, TokenClassifierOutput, wants_dict)
from .pretrained import BertPreTrainedModel, resized_rows


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.hidden_act = config.hidden_act

    def forward(self, hidden_states):
        return self.LayerNorm(dense_activation(self.hidden_act, hidden_states, self.dense))


class BertLMPredictionHead(nn.Module):
    """Transform, then the decoder whose weight is the word-embedding table and whose bias is
    ``bias`` (tied); with ``tie_word_embeddings=False`` the decoder has its own weight and
    bias, as in transformers 5 (``bias`` is then unused, and both are saved)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        tied = getattr(config, "tie_word_embeddings", True)
        self.decoder.bias = self.bias if tied else nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, sequence_output):
        return self.predictions(sequence_output)


class BertOnlyNSPHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, pooled_output):
        return self.seq_relationship(pooled_output)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, sequence_output, pooled_output):
        return self.predictions(sequence_output), self.seq_relationship(pooled_output)


class _WithMLMHead(BertPreTrainedModel):
    def tie_weights(self) -> None:
        if getattr(self.config, "tie_word_embeddings", True):
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
            self.cls.predictions.decoder.bias = self.cls.predictions.bias

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def _resize_output(self, count: int, mean_resizing: bool) -> None:
        """As transformers 5 does: a tied decoder's bias (``bias``) gets zeros for the added
        tokens; an untied decoder keeps its own rows of weight and bias (the added ones drawn
        around their mean with ``mean_resizing``), and ``bias`` becomes its bias."""
        head, decoder = self.cls.predictions, self.cls.predictions.decoder
        with torch.no_grad():
            if getattr(self.config, "tie_word_embeddings", True):
                bias = resized_rows(head.bias, head.bias.new_zeros(count), False)
            else:
                bias = resized_rows(decoder.bias, decoder.bias.new_zeros(count), mean_resizing)
                fresh = nn.Linear(decoder.in_features, count, bias=False, device=decoder.weight.device,
                                  dtype=decoder.weight.dtype)
                self._init_weights(fresh)
                decoder.weight = nn.Parameter(resized_rows(decoder.weight, fresh.weight, mean_resizing),
                                              requires_grad=decoder.weight.requires_grad)
            head.bias = nn.Parameter(bias, requires_grad=decoder.bias.requires_grad)
            decoder.bias = head.bias
            decoder.out_features = count

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, BertLMPredictionHead):
            nn.init.zeros_(module.bias)


def _bert_kwargs(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                 output_attentions, output_hidden_states, kwargs, padded: bool = False):
    """BertModel's arguments; ``padded``: the loss reads padded positions, so run padded."""
    out = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
               position_ids=position_ids, inputs_embeds=inputs_embeds, output_attentions=output_attentions,
               output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
    if padded:
        out["unpad"] = False
    return out


def _labels_at_padding(bert: BertModel, labels, attention_mask) -> bool:
    """A per-token loss would read padded positions: ``labels`` other than -100 where the 2-D
    mask is 0 (one small read from the device; skipped where the encoder runs padded anyway)."""
    if (labels is None or attention_mask is None or attention_mask.dim() != 2 or not bert.unpad
            or labels.numel() != attention_mask.numel() or _tracing() or _capturing(attention_mask.device)):
        return False
    return bool(((labels.reshape(attention_mask.shape) != -100) & (attention_mask == 0)).any())


def _finish(out, return_dict, config):
    return out if wants_dict(config, return_dict) else out.to_tuple()


def _ce(logits, labels):
    """Cross-entropy over class ids ``labels`` (-100 ignored), shaped like ``logits`` without
    the class dimension, or flat; anything else would pair labels with the wrong rows."""
    lead = tuple(logits.shape[:-1])
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got {labels.dtype}")
    if labels.numel() != logits[..., 0].numel() or (labels.dim() > 1 and tuple(labels.shape[:len(lead)]) != lead):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not fit logits of shape {tuple(logits.shape)}: "
                         f"use {lead} or flat")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long())


class BertForPreTraining(_WithMLMHead):
    """Masked language modelling and next sentence prediction; the loss is their sum."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                labels=None, next_sentence_label=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        out = self.bert(**_bert_kwargs(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                       output_attentions, output_hidden_states, kwargs,
                                       _labels_at_padding(self.bert, labels, attention_mask)))
        prediction, relationship = self.cls(out.last_hidden_state, out.pooler_output)
        loss = None
        if labels is not None and next_sentence_label is not None:
            loss = _ce(prediction, labels) + _ce(relationship, next_sentence_label)
        result = BertForPreTrainingOutput(loss, prediction, relationship, out.hidden_states, out.attentions)
        return _finish(result, return_dict, self.config)


class BertForMaskedLM(_WithMLMHead):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                labels=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        out = self.bert(**_bert_kwargs(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                       output_attentions, output_hidden_states, kwargs,
                                       _labels_at_padding(self.bert, labels, attention_mask)))
        logits = self.cls(out.last_hidden_state)
        loss = None if labels is None else _ce(logits, labels)
        result = MaskedLMOutput(loss, logits, out.hidden_states, out.attentions)
        return _finish(result, return_dict, self.config)


class BertForNextSentencePrediction(BertPreTrainedModel):
    """``labels`` (B,): 0 when segment B follows segment A, 1 when it is random."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertOnlyNSPHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                labels=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        labels = kwargs.pop("next_sentence_label", None) if labels is None else labels
        out = self.bert(**_bert_kwargs(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                       output_attentions, output_hidden_states, kwargs))
        logits = self.cls(out.pooler_output)
        loss = None if labels is None else _ce(logits, labels)
        result = NextSentencePredictorOutput(loss, logits, out.hidden_states, out.attentions)
        return _finish(result, return_dict, self.config)


def _classifier_dropout(config: BertConfig) -> nn.Dropout:
    p = config.classifier_dropout
    return nn.Dropout(config.hidden_dropout_prob if p is None else p)


class BertForSequenceClassification(BertPreTrainedModel):
    """Classification or regression on the pooled [CLS] output. The loss follows
    ``config.problem_type`` or, if unset, HF's rule: one label → regression (MSE), integer
    labels → single-label (cross-entropy), float labels → multi-label (BCE with logits)."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                labels=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        out = self.bert(**_bert_kwargs(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                       output_attentions, output_hidden_states, kwargs))
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = None
        if labels is not None:
            problem = self.config.problem_type
            if problem is None:
                if self.num_labels == 1:
                    problem = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem = "single_label_classification"
                else:
                    problem = "multi_label_classification"
                self.config.problem_type = problem
            if problem == "regression":
                loss = F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype)) if self.num_labels == 1 \
                    else F.mse_loss(logits, labels.to(logits.dtype))
            elif problem == "single_label_classification":
                loss = _ce(logits, labels)
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        result = SequenceClassifierOutput(loss, logits, out.hidden_states, out.attentions)
        return _finish(result, return_dict, self.config)


class BertForTokenClassification(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                labels=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        out = self.bert(**_bert_kwargs(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                       output_attentions, output_hidden_states, kwargs,
                                       _labels_at_padding(self.bert, labels, attention_mask)))
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = None if labels is None else _ce(logits, labels)
        result = TokenClassifierOutput(loss, logits, out.hidden_states, out.attentions)
        return _finish(result, return_dict, self.config)


class BertForQuestionAnswering(BertPreTrainedModel):
    """Span extraction: start and end logits per token. Positions outside the sequence are
    clamped and ignored by the loss, as in HF.

    HF's loss normalises over every position, padding included, so with positions given
    the encoder runs padded (HF's logits everywhere); without them, unpadded."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        out = self.bert(**_bert_kwargs(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                       output_attentions, output_hidden_states, kwargs,
                                       padded=start_positions is not None and end_positions is not None))
        start, end = self.qa_outputs(out.last_hidden_state).split(1, dim=-1)
        start, end = start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start.size(1)
            starts = start_positions.reshape(-1).clamp(0, ignored)
            ends = end_positions.reshape(-1).clamp(0, ignored)
            loss = (F.cross_entropy(start, starts, ignore_index=ignored) + F.cross_entropy(end, ends, ignore_index=ignored)) / 2
        result = QuestionAnsweringModelOutput(loss, start, end, out.hidden_states, out.attentions)
        return _finish(result, return_dict, self.config)


class BertForMultipleChoice(BertPreTrainedModel):
    """Inputs are (batch, num_choices, seq_len); one score per choice."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                labels=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        given, rank = (input_ids, 3) if input_ids is not None else (inputs_embeds, 4)
        if given is not None and given.dim() != rank:
            name = "input_ids" if rank == 3 else "inputs_embeds"
            raise ValueError(f"{name} must be (batch, num_choices, seq_len{', hidden' if rank == 4 else ''}), "
                             f"got shape {tuple(given.shape)}")
        choices = given.shape[1] if given is not None else 0

        def flat(t, keep=1):
            return None if t is None else t.reshape(-1, *t.shape[-keep:])
        out = self.bert(**_bert_kwargs(flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids),
                                       flat(inputs_embeds, 2), output_attentions, output_hidden_states, kwargs))
        logits = self.classifier(self.dropout(out.pooler_output)).view(-1, choices)
        loss = None if labels is None else _ce(logits, labels)
        result = MultipleChoiceModelOutput(loss, logits, out.hidden_states, out.attentions)
        return _finish(result, return_dict, self.config)
