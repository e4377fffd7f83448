"""The model workloads of the benchmark: shapes, inputs, and the arithmetic that makes their
times comparable (useful FLOPs: real tokens only).

GPU workloads are BERT-base and BERT-large with random weights at the shapes of
``/work/shared/GPU.md`` (what users run instead was measured there); CPU workloads use the
real all-MiniLM-L6-v2 checkpoint on real sentences. ``tiny=True`` shrinks every model and
shape so the whole GPU code path can be exercised on a CPU in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch

BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            max_position_embeddings=512)
LARGE = dict(BASE, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
# Odd sizes on purpose: head dim 12, a vocabulary that is no power of two.
TINY = dict(vocab_size=997, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=64)
CONFIGS = {"base": BASE, "large": LARGE, "tiny": TINY}


@dataclass(frozen=True)
class Workload:
    key: str                                   # the name --workloads takes
    title: str                                 # the name reports show
    model: str                                 # "base", "large", "tiny" (random weights) or "minilm" (checkpoint)
    batch: int
    seqlen: int                                # padded length; for "minilm", the longest sentence decides
    lengths: Optional[Tuple[int, int]] = None  # real lengths uniform in [lo, hi]; None: every row full
    train: bool = False                        # fwd+bwd of BertForPreTraining under bf16 autocast
    pretrain: bool = False                     # a short pre-training run on a text corpus (bench_pretrain)
    gpu: bool = True                           # meaningful on a GPU only (BERT-size shapes)
    quick_compile: bool = False                # torch.compile competitors run here in --quick

    @property
    def padded(self) -> bool:
        return self.lengths is not None or self.model == "minilm"


WORKLOADS: Dict[str, Workload] = {w.key: w for w in (
    Workload("base-b32-s128", "BERT-base B=32 S=128", "base", 32, 128, quick_compile=True),
    Workload("base-b8-s512", "BERT-base B=8 S=512", "base", 8, 512),
    Workload("base-b1-s128", "BERT-base B=1 S=128", "base", 1, 128, quick_compile=True),
    Workload("base-b32-s512-varlen", "BERT-base B=32 S=512 lengths 32..512", "base", 32, 512, lengths=(32, 512)),
    Workload("large-b8-s512", "BERT-large B=8 S=512", "large", 8, 512),
    Workload("train-base-b32-s128", "train BERT-base B=32 S=128 (bf16 autocast)", "base", 32, 128, train=True,
             quick_compile=True),
    Workload("pretrain-base-b32-s128", "pre-training run BERT-base B=32 S=128", "base", 32, 128, train=True,
             pretrain=True),
    Workload("minilm-b64", "MiniLM-L6 B=64 sentences", "minilm", 64, 0, gpu=False),
    Workload("minilm-b1", "MiniLM-L6 B=1 sentence", "minilm", 1, 0, gpu=False),
)}
GPU_DEFAULT = [k for k, w in WORKLOADS.items() if w.gpu]
CPU_DEFAULT = [k for k, w in WORKLOADS.items() if not w.gpu]


def tiny(w: Workload) -> Workload:
    """The same workload at toy size (for tests and for checking the GPU path on a CPU)."""
    if w.model == "minilm":
        return replace(w, batch=min(w.batch, 8), title=w.title.replace("B=64", "B=8") + " [tiny]")
    seqlen = min(w.seqlen, 32 if w.seqlen > 128 else 24)
    lengths = None if w.lengths is None else (3, seqlen)
    return replace(w, model="tiny", batch=min(w.batch, 3), seqlen=seqlen, lengths=lengths,
                   title=f"{w.title} [tiny B={min(w.batch, 3)} S={seqlen}]")


def lengths_for(w: Workload, generator: torch.Generator) -> torch.Tensor:
    if w.lengths is None:
        return torch.full((w.batch,), w.seqlen, dtype=torch.long)
    lo, hi = w.lengths
    return torch.randint(lo, hi + 1, (w.batch,), generator=generator)


def random_inputs(w: Workload, vocab_size: int, device, seed: int = 0) -> Dict[str, Optional[torch.Tensor]]:
    """Seeded token ids (never the padding id 0 at real positions), and for a padded
    workload a right-padded (B, S) attention mask with the workload's lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths_for(w, g)
    ids = torch.randint(1, vocab_size, (w.batch, w.seqlen), generator=g)
    mask = (torch.arange(w.seqlen)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    out = {"input_ids": ids.to(device), "token_type_ids": torch.zeros_like(ids).to(device),
           "attention_mask": mask.to(device) if w.lengths is not None else None}
    if w.train:
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, torch.full_like(ids, -100))
        labels[:, 0] = ids[:, 0]  # at least one labelled token per row
        out["labels"] = labels.to(device)
        out["next_sentence_label"] = torch.randint(0, 2, (w.batch,), generator=g).to(device)
    return out


def real_lengths(inputs) -> List[int]:
    mask = inputs.get("attention_mask")
    if mask is None:
        b, s = inputs["input_ids"].shape
        return [s] * b
    return [int(n) for n in mask.sum(1).tolist()]


def model_flops(cfg: Dict[str, int], lengths: List[int], train: bool = False) -> float:
    """FLOPs of the work a BERT must do on these sequences: real tokens only.

    Per token, 2 FLOPs per weight of every matmul (QKV, output, FFN in, FFN out); per
    sequence of n real tokens, 4·n²·hidden per layer for QKᵀ and PV, and the pooler.
    Training adds the pre-training heads (transform, vocabulary decoder, NSP) and counts
    backward as twice forward.
    """
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    tokens = sum(lengths)
    per_token = 2 * layers * (4 * h * h + 2 * h * i)
    attention = sum(4 * n * n * h * layers for n in lengths)
    pooler = 2 * h * h * sum(1 for n in lengths if n)
    total = per_token * tokens + attention + pooler
    if train:
        total += 2 * (h * h + h * cfg["vocab_size"]) * tokens + 2 * 2 * h * sum(1 for n in lengths if n)
        total *= 3
    return float(total)


# Short, varied English sentences (lengths from 3 to ~40 words) for the real-checkpoint
# workloads: padded batches with realistic length spread.
SENTENCES = [
    "The cat sat on the mat.",
    "Rain is expected tomorrow afternoon.",
    "She plays the violin in a small orchestra that meets every Thursday evening.",
    "How many moons does Jupiter have?",
    "The committee postponed its decision until more data on the budget shortfall became available.",
    "I forgot my umbrella.",
    "Quantum computers exploit superposition and entanglement to explore many states at once.",
    "Please send the report before noon.",
    "A quick brown fox jumps over the lazy dog.",
    "The museum's new wing houses a collection of Byzantine mosaics, medieval manuscripts, and early printed maps.",
    "Coffee or tea?",
    "He has been learning Japanese for three years and can now read simple newspaper articles.",
    "The bridge was closed for repairs after the storm damaged two of its supporting cables.",
    "Where did you park the car?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Our flight was delayed by four hours because of fog at the destination airport.",
    "The recipe calls for two cups of flour, a pinch of salt, and three eggs.",
    "Stock markets rallied after the central bank left interest rates unchanged.",
    "My grandmother still writes letters by hand.",
    "The software update fixed the memory leak but introduced a new bug in the login screen.",
    "Volcanoes can cool the climate for years when their ash reaches the stratosphere.",
    "Turn left at the second traffic light.",
    "The novel follows three generations of a family of fishermen on a remote island.",
    "Can you recommend a good book about the history of mathematics?",
    "Bees communicate the location of flowers through a dance.",
    "The orchestra tuned their instruments while the audience slowly found their seats in the dimly lit hall.",
    "It was the best of times, it was the worst of times.",
    "Researchers found that regular exercise improves both memory and mood in older adults.",
    "The train to Edinburgh leaves from platform nine.",
    "Please remember to water the plants while I am away.",
    "The ancient city was buried under volcanic ash and rediscovered centuries later by farmers digging a well.",
    "Why is the sky blue?",
    "Machine translation has improved dramatically, yet idioms and humour remain difficult.",
    "The children built a sandcastle with towers, a moat, and a drawbridge made of driftwood.",
    "He apologised for the misunderstanding.",
    "Electric cars are becoming cheaper as battery prices fall.",
    "The detective noticed that the clock on the mantelpiece had stopped at exactly a quarter past three.",
    "We hiked to the summit before sunrise.",
    "The patient's symptoms improved after the dosage was reduced.",
    "Thousands of migrating birds stop at the wetland each spring to rest and feed before continuing north.",
    "Is this seat taken?",
    "The library extended its opening hours during the exam period.",
    "Glaciers in the Alps have lost more than half of their volume since the middle of the nineteenth century.",
    "She laughed so hard that she nearly fell off her chair.",
    "The startup raised twelve million dollars to expand into European markets.",
    "Honey never spoils if it is stored in a sealed container.",
    "The referee's controversial decision in the final minute sparked protests from players and fans alike.",
    "Dinner is ready.",
    "Astronomers detected water vapour in the atmosphere of a planet orbiting a distant star.",
    "The old lighthouse keeper kept a detailed log of every ship that passed the rocky headland.",
    "Do you know the way to the nearest pharmacy?",
    "Learning to ride a bicycle takes patience and a few scraped knees.",
    "The city council approved a plan to plant ten thousand trees along its busiest streets.",
    "Octopuses can change both the colour and the texture of their skin.",
    "After months of negotiation, the two companies finally agreed on the terms of the merger.",
    "The baby fell asleep in the car.",
    "Modern wind turbines can power thousands of homes, but their blades are hard to recycle.",
    "The chef insisted that the sauce be stirred constantly for twenty minutes.",
    "What time does the concert start?",
    "A sudden power cut plunged the entire neighbourhood into darkness just as the match reached extra time.",
    "The spacecraft used the gravity of Venus to slingshot toward the inner solar system.",
    "He painted the fence white.",
    "Economists disagree about whether the recent rise in prices will prove temporary or persistent.",
    "The garden was full of roses, lavender, and the steady hum of bees.",
]
