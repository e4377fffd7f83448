"""The masked-language-modelling collator: pads a list of examples into a batch for
``BertForPreTraining`` and masks it as BERT did.

Of the tokens that are neither special ([CLS], [SEP], …) nor padding, each is chosen with
probability ``mlm_probability`` (15%); a chosen token becomes [MASK] 80% of the time, a
random non-special token 10% of the time, and stays itself 10% of the time. ``labels`` holds
the original id at chosen positions and -100 everywhere else, so only they enter the loss.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import torch


class MLMCollator:
    """``collator(examples) -> batch``; examples are dicts with ``input_ids`` and optionally
    ``token_type_ids``, ``next_sentence_label`` and ``index``.

    Randomness comes from a ``torch.Generator``. An example that carries an ``index`` (as
    :class:`~fastbert.training.data.PretrainingDataset` items do) is masked from a generator
    seeded by ``(seed, epoch, index)``: its masking does not depend on which batch, process
    or accumulation step it lands in, so data-parallel and accumulated training see exactly
    the batch that one process would, and a resumed run masks as the original did. Other
    examples draw, in order, from one generator seeded with ``seed``.
    """

    def __init__(self, tokenizer=None, *, mlm_probability: float = 0.15, mask_probability: float = 0.8,
                 random_probability: float = 0.1, seed: int = 0, pad_to_multiple_of: Optional[int] = None,
                 pad_token_id: Optional[int] = None, mask_token_id: Optional[int] = None,
                 vocab_size: Optional[int] = None, special_token_ids: Optional[Iterable[int]] = None):
        if tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
            mask_token_id = tokenizer.mask_token_id if mask_token_id is None else mask_token_id
            vocab_size = len(tokenizer) if vocab_size is None else vocab_size
            special_token_ids = tokenizer.all_special_ids if special_token_ids is None else special_token_ids
        if pad_token_id is None or mask_token_id is None or vocab_size is None:
            raise ValueError("give a tokenizer, or pad_token_id, mask_token_id and vocab_size")
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must lie in (0, 1), got {mlm_probability}")
        if mask_probability < 0 or random_probability < 0 or mask_probability + random_probability > 1:
            raise ValueError("mask_probability and random_probability must be >= 0 and sum to at most 1")
        self.pad_token_id = int(pad_token_id)
        self.mask_token_id = int(mask_token_id)
        self.vocab_size = int(vocab_size)
        special = {int(i) for i in (special_token_ids or ())} | {self.pad_token_id, self.mask_token_id}
        self.special = torch.tensor(sorted(special), dtype=torch.long)
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        keep[self.special[self.special < self.vocab_size]] = False
        self.random_pool = keep.nonzero().flatten()  # the ids a "random token" is drawn from
        if not len(self.random_pool):
            raise ValueError("the vocabulary has no non-special tokens to draw random replacements from")
        self.mlm_probability = float(mlm_probability)
        self.mask_probability = float(mask_probability)
        self.random_probability = float(random_probability)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = int(seed)
        self.epoch = 0
        self.generator = torch.Generator().manual_seed(self.seed)
        self._example_generator = torch.Generator()

    def set_epoch(self, epoch: int) -> None:
        """A new epoch masks each example afresh (BERT's dynamic masking)."""
        self.epoch = int(epoch)

    def _generator_for(self, example) -> torch.Generator:
        index = example.get("index")
        if index is None:
            return self.generator
        # Distinct, well-spread seeds for (seed, epoch, index); ints hash deterministically.
        key = hash((self.seed, self.epoch, int(index))) & 0x7FFF_FFFF_FFFF_FFFF
        return self._example_generator.manual_seed(key)

    def mask_tokens(self, ids: torch.Tensor, generator: torch.Generator):
        """(masked ids, labels) for one 1-D sequence."""
        eligible = ~torch.isin(ids, self.special)
        draws = torch.rand((2, ids.numel()), generator=generator)
        chosen = (draws[0] < self.mlm_probability) & eligible
        # The second draw splits the chosen tokens: [MASK] below mask_probability, a random
        # token up to mask + random, the token itself above.
        to_mask = chosen & (draws[1] < self.mask_probability)
        to_random = chosen & (draws[1] >= self.mask_probability) & (draws[1] < self.mask_probability + self.random_probability)
        replacements = self.random_pool[torch.randint(len(self.random_pool), (ids.numel(),), generator=generator)]
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        out = torch.where(to_mask, torch.full_like(ids, self.mask_token_id), ids)
        out = torch.where(to_random, replacements, out)
        return out, labels

    def __call__(self, examples: Sequence[Dict]) -> Dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        seqs = [torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples]
        if any(s.dim() != 1 or s.numel() == 0 for s in seqs):
            raise ValueError("every example's input_ids must be a non-empty 1-D sequence")
        bad = [int(s.max()) for s in seqs if int(s.max()) >= self.vocab_size or int(s.min()) < 0]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        length = max(s.numel() for s in seqs)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(seqs)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        token_type_ids = torch.zeros((batch, length), dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        for row, (example, ids) in enumerate(zip(examples, seqs)):
            n = ids.numel()
            masked, row_labels = self.mask_tokens(ids, self._generator_for(example))
            input_ids[row, :n] = masked
            labels[row, :n] = row_labels
            given = example.get("attention_mask")  # an example padded already keeps its padding
            attention_mask[row, :n] = 1 if given is None else torch.as_tensor(given, dtype=torch.long)
            if example.get("token_type_ids") is not None:
                token_type_ids[row, :n] = torch.as_tensor(example["token_type_ids"], dtype=torch.long)
        out = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
               "labels": labels}
        if all(e.get("next_sentence_label") is not None for e in examples):
            out["next_sentence_label"] = torch.tensor([int(e["next_sentence_label"]) for e in examples], dtype=torch.long)
        return out
