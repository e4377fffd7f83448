"""Pre-training: sentence-pair examples (NSP labels match the pairs), gradients of
fastbert.BertForPreTraining equal Hugging Face's under both backends, a tiny model learns the
test corpus, a resumed run continues the same loss curve, accumulation equals the big batch,
and ``fastbert pretrain`` writes a checkpoint that transformers loads."""

import json
import math
import os

import pytest
import torch

import fastbert
from fastbert import BertConfig, BertForPreTraining
from fastbert.ops import OPS
from fastbert.pretrained import read_state_dict
from fastbert.training import (MLMCollator, PreTrainingObjective, PretrainingDataset, Trainer, TrainingArguments,
                               create_examples, train_tokenizer)
from utils import DEVICE, unavailable_kernels

transformers = pytest.importorskip("transformers")

CORPUS = os.path.join(os.path.dirname(__file__), "data", "corpus.txt")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(CORPUS, tmp_path_factory.mktemp("tokenizer"), vocab_size=2000)


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return PretrainingDataset.from_corpus(CORPUS, tokenizer, max_seq_length=32, dupe_factor=3, seed=1)


def _tiny_config(vocab_size, dropout=0.1, **kw):
    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertConfig(vocab_size=vocab_size, **{**size, **kw})


# -- examples -------------------------------------------------------------------------------
def _unique_word_documents(n_docs=12, seed=0):
    """Documents whose every token id is unique, so a token says where it came from."""
    g = torch.Generator().manual_seed(seed)
    docs, where, next_id = [], {}, 10
    for d in range(n_docs):
        doc = []
        for s in range(int(torch.randint(3, 12, (1,), generator=g))):
            sentence = list(range(next_id, next_id + int(torch.randint(2, 15, (1,), generator=g))))
            for pos, t in enumerate(sentence):
                where[t] = (d, s, pos)
            next_id += len(sentence)
            doc.append(sentence)
        docs.append(doc)
    return docs, where


def test_examples_pair_real_and_random_segments():
    docs, where = _unique_word_documents()
    max_len = 40
    examples = create_examples(docs, cls_id=1, sep_id=2, max_seq_length=max_len, dupe_factor=4, seed=3)
    assert examples == create_examples(docs, cls_id=1, sep_id=2, max_seq_length=max_len, dupe_factor=4, seed=3)
    stream = {d: [t for s in doc for t in s] for d, doc in enumerate(docs)}
    longest_sentence = max(len(s) for doc in docs for s in doc)
    labels = []
    for e in examples:
        ids = e.input_ids
        assert len(ids) <= max_len and ids[0] == 1 and ids[-1] == 2 and ids.count(2) == 2
        sep = ids.index(2)
        a, b = ids[1:sep], ids[sep + 1:-1]
        assert a and b
        assert e.token_type_ids == [0] * (sep + 1) + [1] * (len(b) + 1)
        doc_a = {where[t][0] for t in a}
        doc_b = {where[t][0] for t in b}
        assert len(doc_a) == 1 and len(doc_b) == 1, "a segment mixes documents"
        da, db = doc_a.pop(), doc_b.pop()
        pa = [stream[da].index(t) for t in a]
        pb = [stream[db].index(t) for t in b]
        assert pa == list(range(pa[0], pa[0] + len(a))), "segment A is not contiguous text"
        assert pb == list(range(pb[0], pb[0] + len(b))), "segment B is not contiguous text"
        if e.next_sentence_label == 0:
            assert da == db, "a 'next' pair crosses documents"
            # B follows A; only tokens trimmed to fit (A's end, B's start) lie between them.
            gap = pb[0] - pa[-1] - 1
            assert 0 <= gap < longest_sentence, f"B does not follow A (gap {gap})"
            if len(ids) < max_len:  # nothing trimmed: A ends and B starts on sentence boundaries
                assert gap == 0 and where[b[0]][2] == 0
        else:
            assert da != db, "a 'random' segment came from the same document"
        assert e.a_source[0] == da and e.b_source[0] == db
        labels.append(e.next_sentence_label)
    # BERT's recipe: half the multi-sentence chunks get a random B (single-sentence chunks always do).
    frac_next = labels.count(0) / len(labels)
    assert 0.25 < frac_next < 0.6, frac_next


def test_dataset_items(tokenizer, dataset):
    assert len(dataset) > 100
    for i in (0, 17, len(dataset) - 1):
        item = dataset[i]
        ids, types = item["input_ids"], item["token_type_ids"]
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id and len(ids) <= 32
        sep = int((ids == tokenizer.sep_token_id).nonzero()[0])
        assert (types[:sep + 1] == 0).all() and (types[sep + 1:] == 1).all()
        assert item["index"] == i and int(item["next_sentence_label"]) in (0, 1)
    with pytest.raises(ValueError, match="2 non-empty documents"):
        create_examples([[[5, 6]]], cls_id=1, sep_id=2)


# -- gradients against transformers ------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_gradients_match_transformers(backend):
    if backend == "triton":
        if unavailable_kernels(OPS):
            pytest.skip("the C++ extension is not built (FASTBERT_SKIP_EXT)")
    config = _tiny_config(vocab_size=97, dropout=0.0, hidden_size=32, intermediate_size=48, max_position_embeddings=16)
    hf_config = transformers.BertConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"})
    hf_config._attn_implementation = "eager"
    hf = transformers.BertForPreTraining(hf_config).train()
    ours = BertForPreTraining(config).train()
    ours.load_state_dict(hf.state_dict(), strict=True)
    hf.to(DEVICE), ours.to(DEVICE)

    g = torch.Generator().manual_seed(0)
    batch, seqlen = 3, 11
    input_ids = torch.randint(5, 97, (batch, seqlen), generator=g)
    attention_mask = torch.ones(batch, seqlen, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[2, 2:] = 0
    token_type_ids = (torch.arange(seqlen) > 4).long().expand(batch, -1).contiguous()
    # Labels on real tokens only: fastbert's outputs at padded positions are zeros by design.
    labels = torch.where((torch.rand(batch, seqlen, generator=g) < 0.3) & attention_mask.bool(), input_ids, -100)
    labels[0, 0] = input_ids[0, 0]
    nsp = torch.tensor([0, 1, 1])
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                  labels=labels, next_sentence_label=nsp)
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}  # drawn on the CPU (seeded generator), run on DEVICE

    with fastbert.use_backend(backend):
        loss = ours(**inputs).loss
        loss.backward()
    hf_loss = hf(**inputs).loss
    hf_loss.backward()
    assert abs(loss.item() - hf_loss.item()) <= 1e-5
    theirs = dict(hf.named_parameters(remove_duplicate=False))
    checked = 0
    for name, p in ours.named_parameters():
        ref = theirs[name].grad
        assert p.grad is not None and ref is not None, name
        err = (p.grad - ref).abs().max().item()
        assert err <= 1e-5, f"{name}: max |grad difference| {err:.3g}"
        checked += 1
    assert checked == len(list(ours.parameters()))


def test_objective_equals_model_loss(dataset, tokenizer):
    """The trainer's loss (vocabulary projection on masked tokens only) is the model's."""
    model = BertForPreTraining(_tiny_config(len(tokenizer), dropout=0.0)).eval()
    batch = MLMCollator(tokenizer)([dataset[i] for i in range(8)])
    mlm, nsp = PreTrainingObjective(model)(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask",
                                                                      "labels", "next_sentence_label")})
    n_masked = int((batch["labels"] != -100).sum())
    expected = model(**batch).loss
    torch.testing.assert_close(mlm / n_masked + nsp / 8, expected, rtol=1e-5, atol=1e-6)


# -- training ---------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices gain nothing from threads, and a busy CI machine loses a lot to them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(tmp_path, tokenizer, dataset, config, **kw):
    torch.manual_seed(0)
    model = BertForPreTraining(config)
    args = TrainingArguments(**{"output_dir": str(tmp_path), "progress": False, "device": "cpu", **kw})
    return Trainer(model, dataset, MLMCollator(tokenizer, seed=args.seed), args, tokenizer=tokenizer)


def test_tiny_model_learns_the_corpus(tmp_path, tokenizer, dataset):
    trainer = _trainer(tmp_path, tokenizer, dataset, _tiny_config(len(tokenizer), dropout=0.0),
                       max_steps=300, batch_size=32, learning_rate=3e-3, warmup_steps=20, logging_steps=50)
    history = trainer.train()
    assert [r["step"] for r in history] == list(range(1, 301))
    # An untrained model predicts about uniformly: its loss starts at ln(vocabulary size).
    first = history[0]["mlm_loss"]
    assert abs(first - math.log(len(tokenizer))) < 0.3
    last = sum(r["mlm_loss"] for r in history[-20:]) / 20
    assert last < 0.8 * first, f"MLM loss went from {first:.3f} to {last:.3f}"
    assert history[0]["lr"] < history[19]["lr"] and history[-1]["lr"] < history[100]["lr"]  # warm-up, then decay
    # The final model is in Hugging Face's format.
    assert os.path.isfile(tmp_path / "model.safetensors") and os.path.isfile(tmp_path / "tokenizer.json")


def test_resume_continues_the_same_loss_curve(tmp_path, tokenizer, dataset):
    config = _tiny_config(len(tokenizer))  # dropout on: the RNG state must come back too
    common = dict(max_steps=14, batch_size=24, learning_rate=1e-3, warmup_steps=3, logging_steps=4)
    straight = _trainer(tmp_path / "straight", tokenizer, dataset, config, **common).train()
    interrupted = _trainer(tmp_path / "run", tokenizer, dataset, config, save_steps=4, **common)
    interrupted.args.max_steps = 6  # stopped (as if killed) after the checkpoint at step 4
    interrupted.train()
    assert interrupted.steps_per_epoch < 14, "the resumed part should cross an epoch boundary"
    resumed = _trainer(tmp_path / "run", tokenizer, dataset, config, **common)
    history = resumed.train(resume_from=str(tmp_path / "run" / "checkpoint-4"))
    assert [r["loss"] for r in history] == [r["loss"] for r in straight], "resumed losses differ"
    with open(tmp_path / "run" / "log.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 15))
    final = read_state_dict(tmp_path / "run")
    for key, value in read_state_dict(tmp_path / "straight").items():
        assert torch.equal(final[key], value), key


def test_accumulation_equals_the_big_batch(tmp_path, tokenizer, dataset):
    config = _tiny_config(len(tokenizer), dropout=0.0)
    big = _trainer(tmp_path / "big", tokenizer, dataset, config, max_steps=5, batch_size=8, learning_rate=1e-3)
    small = _trainer(tmp_path / "acc", tokenizer, dataset, config, max_steps=5, batch_size=4,
                     gradient_accumulation_steps=2, learning_rate=1e-3)
    h_big, h_small = big.train(), small.train()
    for a, b in zip(h_big, h_small):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and a["tokens"] == b["tokens"]
    params = dict(small.model.named_parameters())
    for name, p in big.model.named_parameters():
        # Adam divides by the gradient's running RMS, so summation-order noise in a tiny
        # gradient can move a weight by a visible fraction of the learning rate.
        err = (p - params[name]).abs().max().item()
        assert err <= 1e-5, f"{name}: {err:.3g}"


def test_cli_checkpoint_loads_in_transformers(tmp_path, tokenizer):
    from fastbert.cli import main
    tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "out"
    rc = main(["pretrain", "--config", "tiny", "--tokenizer", str(tmp_path / "tok"), "--corpus", CORPUS,
               "--output-dir", str(out), "--max-steps", "3", "--batch-size", "4", "--max-seq-length", "32",
               "--no-progress", "--device", "cpu", "--save-steps", "2"])
    assert rc == 0
    assert os.path.isfile(out / "checkpoint-2" / "trainer_state.pt")
    hf = transformers.BertForPreTraining.from_pretrained(str(out)).eval()
    ours = BertForPreTraining.from_pretrained(out).eval()
    assert ours.config.num_hidden_layers == 2 and ours.config.hidden_size == 128
    enc = fastbert.BertTokenizer.from_pretrained(out)(["The river runs past the mill."], ["A baker wakes."],
                                                       return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(ours(**enc).prediction_logits, hf(**enc).prediction_logits, rtol=1e-4, atol=1e-4)
    assert main(["pretrain", "--tokenizer", str(tmp_path / "tok"), "--corpus", str(tmp_path / "missing.txt"),
                 "--output-dir", str(out), "--no-progress"]) == 2


def test_the_trainers_host_packing_matches_the_models_own(tokenizer, dataset):
    """The trainer packs each padded batch from its host mask (no device read) and runs the
    model on that layout: loss and every gradient equal the model unpadding by itself."""
    from types import SimpleNamespace

    from fastbert import assume_valid_ids
    from fastbert.cuda_graphs import capture_layout

    torch.manual_seed(0)
    model = BertForPreTraining(_tiny_config(len(tokenizer), dropout=0.0))
    batch = MLMCollator(tokenizer)([dataset[i] for i in range(8)])
    assert not batch["attention_mask"].all(), "the batch should have padding"
    objective = PreTrainingObjective(model)
    args = [batch[k] for k in ("input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label")]
    params = [p for p in model.parameters() if p.requires_grad]
    expected = objective(*args)
    expected_grads = torch.autograd.grad(sum(expected), params)
    host = SimpleNamespace(device=torch.device("cpu"))
    packing = Trainer._packing(host, batch["attention_mask"])
    assert packing.total == int(batch["attention_mask"].sum())
    assert Trainer._packing(host, torch.ones_like(batch["attention_mask"])) is None  # no padding, no packing
    with capture_layout(model, packing), assume_valid_ids():
        got = objective(*args)
    got_grads = torch.autograd.grad(sum(got), params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_the_trainer_checks_ids_against_the_model(tmp_path, tokenizer, dataset):
    """Ids are checked on the host, against the model (whose vocabulary may be smaller than
    the tokenizer's), before the forward runs without its device-side check."""
    small = _tiny_config(len(tokenizer) // 2)
    trainer = _trainer(tmp_path, tokenizer, dataset, small, max_steps=2, batch_size=8)
    with pytest.raises(ValueError, match=rf"input_ids contains \d+, outside the model's range \[0, {len(tokenizer) // 2}\)"):
        trainer.train()


# -- arguments, schedule, resume and divergence ----------------------------------------------
@pytest.mark.parametrize("bad,match", [
    (dict(learning_rate=float("inf")), "learning_rate must be positive and finite"),
    (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
    (dict(max_grad_norm=-1.0), "max_grad_norm must be >= 0"),  # would scale every gradient by a negative factor
    (dict(max_grad_norm=float("nan")), "max_grad_norm must be >= 0"),
    (dict(device="foo"), "device 'foo' is not a device torch knows"),
] + ([] if torch.cuda.is_available() else [(dict(device="cuda"), "sees no CUDA GPU")]))
def test_training_arguments_refused(bad, match, tmp_path, tokenizer, dataset):
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, tokenizer, dataset, _tiny_config(len(tokenizer)), **bad)


def test_schedule_is_transformers_linear_warmup():
    from fastbert.training.trainer import linear_schedule
    from transformers import get_linear_schedule_with_warmup
    rates = []
    for make in (linear_schedule, get_linear_schedule_with_warmup):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        schedule = make(opt, 3, 10)
        rates.append([])
        for _ in range(10):
            rates[-1].append(schedule.get_last_lr()[0])
            opt.step(), schedule.step()
    assert rates[0] == rates[1] and rates[0][:4] == [0.0, 1 / 3, 2 / 3, 1.0]
    with pytest.warns(UserWarning, match="never reaches its peak"):
        TrainingArguments(output_dir="x", max_steps=2, warmup_steps=5)


def test_resume_refuses_other_data_or_batch_settings(tmp_path, tokenizer, dataset):
    config = _tiny_config(len(tokenizer))
    _trainer(tmp_path / "run", tokenizer, dataset, config, max_steps=2, batch_size=8).train()
    for changed, match in ((dict(batch_size=4), "batch_size 8 -> 4"), (dict(seed=7), "seed 42 -> 7")):
        trainer = _trainer(tmp_path / "again", tokenizer, dataset, config, max_steps=4, **{"batch_size": 8, **changed})
        with pytest.raises(ValueError, match=match):
            trainer.train(resume_from=str(tmp_path / "run"))
    other = PretrainingDataset.from_corpus(CORPUS, tokenizer, max_seq_length=24, dupe_factor=3, seed=1)
    with pytest.raises(ValueError, match="examples"):
        _trainer(tmp_path / "again", tokenizer, other, config, max_steps=4, batch_size=8).train(
            resume_from=str(tmp_path / "run"))


def test_a_diverged_loss_stops_the_run(tmp_path, tokenizer, dataset, monkeypatch):
    trainer = _trainer(tmp_path, tokenizer, dataset, _tiny_config(len(tokenizer)), max_steps=3, batch_size=8,
                       logging_steps=1)
    real = trainer.objective.forward
    monkeypatch.setattr(trainer.objective, "forward", lambda *a: tuple(x * float("nan") for x in real(*a)))
    with pytest.raises(FloatingPointError, match="the loss is nan at step 1"):
        trainer.train()
    assert not os.path.isfile(tmp_path / "model.safetensors")  # no diverged model written


def test_cli_errors_and_init_from_config(tmp_path, tokenizer):
    from fastbert.cli import main
    tokenizer.save_pretrained(tmp_path / "tok")
    base = ["pretrain", "--tokenizer", str(tmp_path / "tok"), "--corpus", CORPUS, "--max-seq-length", "32",
            "--batch-size", "4", "--max-steps", "1", "--no-progress", "--device", "cpu"]
    (tmp_path / "file").write_text("")
    assert main(base + ["--output-dir", str(tmp_path / "file")]) == 2
    assert main(base + ["--output-dir", str(tmp_path / "o"), "--resume", str(tmp_path / "nowhere")]) == 2
    assert main(base + ["--output-dir", str(tmp_path / "o"), "--dupe-factor", "0"]) == 2
    assert main(base + ["--output-dir", str(tmp_path / "small"), "--config", "mini"]) == 0
    assert main(base + ["--output-dir", str(tmp_path / "more"), "--init-from", str(tmp_path / "small")]) == 0
    assert BertConfig.from_pretrained(tmp_path / "more").num_hidden_layers == 4  # the checkpoint's, not tiny's
