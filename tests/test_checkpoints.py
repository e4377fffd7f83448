"""Checkpoints in Hugging Face's format: state-dict keys and shapes, strict loads both ways,
save/load round trips through transformers, key conversions, and clear errors."""

import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastbert
from fastbert import CheckpointError
from hf_bert import PADDINGS, check, config_kwargs, inputs, transformers, twins

CLASSES = ["BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
           "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
           "BertForMultipleChoice"]
CFG = config_kwargs("h32-4h-2l-relu")


def _ids():
    ids, tt, mask = inputs(PADDINGS["mixed"], CFG["vocab_size"], 3)
    return ids, mask


@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_keys_shapes_and_strict_loads_both_ways(cls):
    hf, fb = twins(cls, **CFG)  # twins() already loads HF -> fastbert with strict=True
    hs, fs = hf.state_dict(), fb.state_dict()
    assert list(fs) == list(hs)
    assert all(fs[k].shape == hs[k].shape and fs[k].dtype == hs[k].dtype for k in hs)
    for k in hs:
        assert torch.equal(fs[k], hs[k]), k
    # fastbert -> HF: a fresh HF model takes fastbert's weights, strictly, and agrees
    fresh = getattr(transformers, cls)(transformers.BertConfig(**CFG))
    fresh.load_state_dict(fb.state_dict(), strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, fs[k]), k


@pytest.mark.parametrize("cls", CLASSES)
def test_save_pretrained_loads_in_transformers(cls, tmp_path):
    _, fb = twins(cls, **CFG)
    fb.eval().save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    hf = getattr(transformers, cls).from_pretrained(tmp_path).eval()
    assert hf.dtype == torch.float32
    ids, mask = _ids()
    if cls == "BertForMultipleChoice":
        ids, mask = ids.view(2, 2, -1), mask.view(2, 2, -1)
    m = mask.reshape(-1, mask.shape[-1]).bool()
    a, b = fb(ids, attention_mask=mask)[0], hf(ids, attention_mask=mask)[0]
    if a.shape[:2] == m.shape:  # per-token outputs: compare real positions
        a, b = a[m], b[m]
    check(f"save->hf:{cls}", a, b)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("cls", ["BertForPreTraining", "BertForSequenceClassification"])
def test_transformers_save_loads_in_fastbert(cls, fmt, tmp_path):
    hf, _ = twins(cls, **CFG)
    hf.eval().save_pretrained(tmp_path)
    if fmt == "bin":  # transformers 5 writes safetensors only; older releases wrote the full state dict with torch.save
        os.remove(tmp_path / "model.safetensors")
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin" if fmt == "bin" else "model.safetensors"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is missing or dropped
        fb = getattr(fastbert, cls).from_pretrained(tmp_path, device="cpu")
    assert not fb.training
    ids, mask = _ids()
    m = mask.bool()
    a, b = fb(ids, attention_mask=mask)[0], hf(ids, attention_mask=mask)[0]
    check(f"hf->fastbert:{cls}:{fmt}", a[m] if a.dim() == 3 else a, b[m] if b.dim() == 3 else b)
    if cls == "BertForPreTraining":
        assert fb.cls.predictions.decoder.weight is fb.bert.embeddings.word_embeddings.weight
    half = getattr(fastbert, cls).from_pretrained(tmp_path, dtype=torch.float16, device="cpu")
    assert half.dtype == torch.float16 and all(p.dtype == torch.float16 for p in half.parameters())
    assert half.device.type == "cpu"
    by_name = getattr(fastbert, cls).from_pretrained(tmp_path, dtype="bfloat16")
    assert by_name.dtype == torch.bfloat16
    assert getattr(fastbert, cls).from_pretrained(tmp_path, dtype="auto").dtype == torch.float32


def test_head_checkpoint_into_bert_model_and_bare_keys_into_head(tmp_path):
    hf, _ = twins("BertForPreTraining", **CFG)
    hf.save_pretrained(tmp_path / "head")
    with pytest.warns(UserWarning, match="not used"):  # cls.* are dropped, as HF does
        bare = fastbert.BertModel.from_pretrained(tmp_path / "head")
    ids, mask = _ids()
    m = mask.bool()
    check("bert.-prefixed into BertModel", bare(ids, attention_mask=mask).last_hidden_state[m],
          hf.bert(ids, attention_mask=mask).last_hidden_state[m])
    bare.save_pretrained(tmp_path / "bare")
    assert not any(k.startswith("bert.") for k in load_file(tmp_path / "bare" / "model.safetensors"))
    with pytest.warns(UserWarning, match="newly initialised.*classifier"):
        head = fastbert.BertForSequenceClassification.from_pretrained(tmp_path / "bare", num_labels=4)
    assert head.classifier.out_features == 4 and head.config.num_labels == 4
    check("bare keys into a head", head.bert(ids, attention_mask=mask).last_hidden_state[m],
          hf.bert(ids, attention_mask=mask).last_hidden_state[m])
    with pytest.raises(CheckpointError, match="missing: classifier.weight, classifier.bias"):
        fastbert.BertForSequenceClassification.from_pretrained(tmp_path / "bare", strict=True)



def test_any_head_loads_any_other_heads_checkpoint(tmp_path):
    """As in transformers: a pre-training checkpoint (with a pooler) fine-tunes into a head
    without one (token tagging, QA, MLM) and the other way round; the encoder's weights
    arrive whole, the pooler and other heads' weights are dropped or initialised, with a
    warning."""
    hf_saved = {}
    for cls in CLASSES:
        hf, _ = twins(cls, **CFG)
        hf.save_pretrained(tmp_path / cls)
        hf_saved[cls] = {k.removeprefix("bert."): v for k, v in hf.state_dict().items()
                         if not k.startswith(("cls.", "classifier.", "qa_outputs.")) and "pooler" not in k}
    for src in CLASSES:
        for dst in CLASSES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    theirs = getattr(transformers, dst).from_pretrained(tmp_path / src)
                except RuntimeError:  # a classifier of another shape (multiple choice's one logit)
                    with pytest.raises(CheckpointError, match="mis-shaped: .*classifier.weight"):
                        getattr(fastbert, dst).from_pretrained(tmp_path / src)
                    continue
                ours = getattr(fastbert, dst).from_pretrained(tmp_path / src)
            assert list(ours.state_dict()) == list(theirs.state_dict()), (src, dst)
            for key, value in ours.state_dict().items():
                bare = key.removeprefix("bert.")
                if bare in hf_saved[src]:
                    assert torch.equal(value, hf_saved[src][bare]), (src, dst, key)


def test_legacy_gamma_beta_names(tmp_path):
    _, fb = twins("BertForMaskedLM", **CFG)
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in fb.state_dict().items() if not k.startswith("cls.predictions.decoder")}
    assert any(k.endswith("gamma") for k in state)
    fb.config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = fastbert.BertForMaskedLM.from_pretrained(tmp_path)
    for k, v in fb.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_hugging_face_loading_options(tmp_path):
    """from_pretrained takes what HF users pass: a single-device device_map places the model,
    subfolder is joined to the path, download and loading options are accepted without being
    written into the config (or into a saved config.json); a split device_map is refused."""
    _, fb = twins("BertModel", **CFG)
    fb.save_pretrained(tmp_path / "sub")
    hub = dict(revision="main", attn_implementation="sdpa", trust_remote_code=True, low_cpu_mem_usage=True,
               use_safetensors=True, local_files_only=True)
    for device_map in ("cpu", "auto" if not torch.cuda.is_available() else "cpu", {"": "cpu"}, torch.device("cpu")):
        loaded = fastbert.BertModel.from_pretrained(tmp_path, subfolder="sub", device_map=device_map, **hub)
        assert loaded.device.type == "cpu"
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), fb.state_dict().values()))
    assert not any(hasattr(loaded.config, key) for key in list(hub) + ["device_map", "subfolder"])
    loaded.save_pretrained(tmp_path / "again")
    saved = (tmp_path / "again" / "config.json").read_text()
    assert "revision" not in saved and "attn_implementation" not in saved and "device_map" not in saved
    with pytest.raises(ValueError, match="one device; device_map spreads it over"):
        fastbert.BertModel.from_pretrained(tmp_path / "sub", device_map={"embeddings": "cpu", "encoder": "cuda:0"})
    with pytest.raises(ValueError, match="device_map='balanced': fastbert places a model on one device"):
        fastbert.BertModel.from_pretrained(tmp_path / "sub", device_map="balanced")
    with pytest.raises(ValueError, match="disagree"):
        fastbert.BertModel.from_pretrained(tmp_path / "sub", device="cpu", device_map="cuda:1")


def test_weights_file_path_and_sharded_index(tmp_path):
    _, fb = twins("BertModel", **CFG)
    fb.save_pretrained(tmp_path)
    one = fastbert.BertModel.from_pretrained(tmp_path / "model.safetensors")  # config.json beside it
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), fb.state_dict().values()))
    # a sharded checkpoint: two files and an index
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    fb.config.save_pretrained(sharded)
    state = {k: v.contiguous() for k, v in fb.state_dict().items()}
    keys = list(state)
    save_file({k: state[k] for k in keys[:10]}, sharded / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in keys[10:]}, sharded / "model-00002-of-00002.safetensors")
    weight_map = {k: ("model-00001-of-00002.safetensors" if i < 10 else "model-00002-of-00002.safetensors")
                  for i, k in enumerate(keys)}
    (sharded / "model.safetensors.index.json").write_text(__import__("json").dumps({"weight_map": weight_map}))
    two = fastbert.BertModel.from_pretrained(sharded)
    assert all(torch.equal(a, b) for a, b in zip(two.state_dict().values(), fb.state_dict().values()))


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_sharded_and_bin_saves_load_in_both(safe, tmp_path):
    """save_pretrained's max_shard_size and safe_serialization write what transformers and
    fastbert both load; a later save in the same directory replaces the earlier files."""
    hf_ref, fb = twins("BertForMaskedLM", **CFG)
    fb.eval().save_pretrained(tmp_path, max_shard_size="20KB", safe_serialization=safe)
    stem, ext, index = ("model", "safetensors", "model.safetensors.index.json") if safe else \
        ("pytorch_model", "bin", "pytorch_model.bin.index.json")
    shards = sorted(f for f in os.listdir(tmp_path) if f.startswith(stem + "-"))
    assert len(shards) > 2 and shards[0] == f"{stem}-00001-of-{len(shards):05d}.{ext}" and index in os.listdir(tmp_path)
    index_map = __import__("json").loads((tmp_path / index).read_text())
    assert sorted(set(index_map["weight_map"].values())) == shards and index_map["metadata"]["total_size"] > 20_000
    ids, mask = _ids()
    m = mask.bool()
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    again = fastbert.BertForMaskedLM.from_pretrained(tmp_path)
    want = fb(ids, attention_mask=mask).logits[m]
    check("sharded->hf", hf(ids, attention_mask=mask).logits[m], want)
    assert torch.equal(again(ids, attention_mask=mask).logits[m], want)
    fb.save_pretrained(tmp_path)  # unsharded now: the shards and the index go
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_save_pretrained_options(tmp_path):
    _, fb = twins("BertModel", **CFG)
    fb.save_pretrained(tmp_path / "not-main", is_main_process=False)
    assert not (tmp_path / "not-main").exists()
    halved = {k: v / 2 for k, v in fb.state_dict().items()}
    fb.save_pretrained(tmp_path / "given", state_dict=halved, token=None)
    loaded = fastbert.BertModel.from_pretrained(tmp_path / "given")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in halved.items())
    with pytest.raises(ValueError, match="push_to_hub is not supported"):
        fb.save_pretrained(tmp_path, push_to_hub=True)
    with pytest.raises(TypeError, match="unsupported arguments \\['variant'\\]"):
        fb.save_pretrained(tmp_path, variant="fp16")
    with pytest.raises(ValueError, match="max_shard_size must be a positive byte count"):
        fb.save_pretrained(tmp_path, max_shard_size="lots")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        fb.save_pretrained(tmp_path / "file")


def test_errors_name_every_bad_key(tmp_path):
    _, fb = twins("BertModel", **CFG)
    state = dict(fb.state_dict())
    del state["encoder.layer.1.output.dense.weight"], state["embeddings.LayerNorm.bias"]
    state["encoder.layer.0.attention.self.query.weight"] = torch.zeros(5, 32)
    state["encoder.layer.7.output.dense.weight"] = torch.zeros(3)
    model = fastbert.BertModel(fastbert.BertConfig(**CFG))
    before = model.encoder.layer[0].attention.self.key.weight.clone()
    with pytest.raises(CheckpointError) as err:
        model.load_checkpoint_state(state)
    msg = str(err.value)
    for key in ("encoder.layer.1.output.dense.weight", "embeddings.LayerNorm.bias",
                "encoder.layer.0.attention.self.query.weight: checkpoint (5, 32), model (32, 32)",
                "encoder.layer.7.output.dense.weight"):
        assert key in msg
    assert "missing" in msg and "unexpected" in msg and "mis-shaped" in msg
    assert torch.equal(model.encoder.layer[0].attention.self.key.weight, before)  # nothing half-loaded


def test_untied_decoder_must_be_in_the_checkpoint(tmp_path):
    cfg = dict(CFG, tie_word_embeddings=False)
    _, fb = twins("BertForMaskedLM", **cfg)
    fb.save_pretrained(tmp_path)
    assert "cls.predictions.decoder.weight" in load_file(tmp_path / "model.safetensors")
    assert "cls.predictions.decoder.bias" in load_file(tmp_path / "model.safetensors")  # its own, as in HF 5
    loaded = fastbert.BertForMaskedLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.cls.predictions.decoder.weight, fb.cls.predictions.decoder.weight)
    assert loaded.cls.predictions.decoder.weight is not loaded.bert.embeddings.word_embeddings.weight
    with torch.no_grad():  # the untied biases differ: HF's load of this save reads the decoder's
        fb.cls.predictions.decoder.bias.normal_()
    fb.save_pretrained(tmp_path / "again")
    theirs = transformers.BertForMaskedLM.from_pretrained(tmp_path / "again").eval()
    ids, mask = _ids()
    check("untied save into transformers", fb.eval()(ids, attention_mask=mask).logits[mask.bool()],
          theirs(ids, attention_mask=mask).logits[mask.bool()])
    state = {k: v for k, v in fb.state_dict().items() if k != "cls.predictions.decoder.weight"}
    with pytest.raises(CheckpointError, match="cls.predictions.decoder.weight"):
        fastbert.BertForMaskedLM(fastbert.BertConfig(**cfg)).load_checkpoint_state(state, strict=True)


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_damaged_files_give_a_checkpoint_error(fmt, damage, tmp_path):
    _, fb = twins("BertModel", **CFG)
    fb.config.save_pretrained(tmp_path)
    name = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in fb.state_dict().items()}, tmp_path / name)
    else:
        torch.save(fb.state_dict(), tmp_path / name)
    data = (tmp_path / name).read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = bytes(b ^ 0x5A for b in data[:64]) + data[64:]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        fastbert.BertModel.from_pretrained(tmp_path)


def test_missing_files_and_non_tensor_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at {tmp_path / 'nope'}: fastbert loads a local"):
        fastbert.BertModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        fastbert.BertModel.from_pretrained(tmp_path)
    fastbert.BertConfig(**CFG).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        fastbert.BertModel.from_pretrained(tmp_path)
    torch.save({"a": 1}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        fastbert.BertModel.from_pretrained(tmp_path)
    twins("BertModel", **CFG)[1].save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        fastbert.BertModel.from_pretrained(tmp_path, dtype="int8")


@pytest.mark.parametrize("index,match", [
    ("{not json", "could not read the shard index"),
    ('{"metadata": {}}', "could not read the shard index .*KeyError"),
    ('{"weight_map": {"a": "../elsewhere.safetensors"}}', "shards are files beside the index"),
])
def test_bad_shard_index(index, match, tmp_path):
    fastbert.BertConfig(**CFG).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=match):
        fastbert.BertModel.from_pretrained(tmp_path)
