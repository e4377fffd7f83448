"""BertConfig: Hugging Face's names and defaults, round trips, labels, invalid values."""

import json

import pytest

import fastbert
from fastbert import BertConfig

transformers = pytest.importorskip("transformers")


def test_defaults_and_names_match_transformers():
    ours, theirs = BertConfig().to_dict(), transformers.BertConfig().to_dict()
    shared = set(ours) & set(theirs)
    # every field of HF's BertConfig but its bookkeeping is here, with HF's default
    assert set(theirs) - shared <= {"_name_or_path", "transformers_version"}
    for key in sorted(shared):
        assert ours[key] == theirs[key], key
    assert len(shared) > 25


def test_num_labels_and_id2label():
    c = BertConfig(num_labels=3)
    assert c.num_labels == 3 and c.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert c.label2id == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    h = transformers.BertConfig(num_labels=3)
    assert c.id2label == h.id2label and c.label2id == h.label2id
    named = BertConfig(id2label={"0": "neg", "1": "pos"})
    assert named.num_labels == 2 and named.id2label == {0: "neg", 1: "pos"} and named.label2id == {"neg": 0, "pos": 1}
    named.num_labels = 4
    assert list(named.id2label) == [0, 1, 2, 3]
    assert BertConfig().num_labels == 2


def test_round_trips(tmp_path):
    c = BertConfig(hidden_size=96, num_attention_heads=6, num_hidden_layers=3, hidden_act="gelu_new",
                   num_labels=3, problem_type="multi_label_classification", custom_field={"kept": [1, 2]})
    assert BertConfig.from_dict(c.to_dict()) == c
    c.save_pretrained(tmp_path)
    assert BertConfig.from_pretrained(tmp_path) == c
    assert BertConfig.from_json_file(tmp_path / "config.json") == c
    assert BertConfig.from_pretrained(tmp_path / "config.json") == c
    assert BertConfig.from_pretrained(tmp_path).custom_field == {"kept": [1, 2]}
    assert BertConfig.from_pretrained(tmp_path, hidden_dropout_prob=0.0).hidden_dropout_prob == 0.0
    # HF reads ours, and we read HF's
    h = transformers.BertConfig.from_pretrained(tmp_path)
    assert h.hidden_size == 96 and h.id2label == c.id2label and h.problem_type == c.problem_type
    h.save_pretrained(tmp_path / "hf")
    back = BertConfig.from_pretrained(tmp_path / "hf")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "hidden_act", "id2label", "problem_type"):
        assert getattr(back, key) == getattr(c, key), key


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_size=100, num_attention_heads=12), "must be a multiple of num_attention_heads"),
    (dict(hidden_act="swish"), "hidden_act 'swish' is not supported"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type 'relative_key'"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(num_hidden_layers=-1), "num_hidden_layers must be a positive integer"),
    (dict(intermediate_size=3.5), "intermediate_size must be a positive integer"),
    (dict(hidden_dropout_prob=1.0), r"hidden_dropout_prob must be in \[0, 1\)"),
    (dict(classifier_dropout=-0.1), r"classifier_dropout must be in \[0, 1\)"),
    (dict(layer_norm_eps=0), "layer_norm_eps must be positive"),
    (dict(is_decoder=True), "encoder"),
    (dict(add_cross_attention=True), "encoder"),
    (dict(problem_type="ranking"), "problem_type 'ranking'"),
    (dict(vocab_size=10, pad_token_id=10), r"pad_token_id must be None or an id in \[0, vocab_size=10\), got 10"),
    (dict(pad_token_id="0"), "pad_token_id must be None or an id"),
    (dict(num_labels=-1), "num_labels must be a positive integer, got -1"),
    (dict(id2label={"a": "x"}), "id2label must map class ids"),
])
def test_invalid_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BertConfig(**kwargs)


def test_invalid_files(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        BertConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(ValueError, match="'roberta' model, not 'bert'"):
        BertConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        BertConfig.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="vocab_size"):
        BertConfig.from_pretrained(tmp_path, vocab_size=-3)


def test_model_rejects_a_foreign_config():
    with pytest.raises(TypeError, match="fastbert.BertConfig"):
        fastbert.BertModel(transformers.BertConfig())
