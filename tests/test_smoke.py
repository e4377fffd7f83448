import torch

import fastbert


def test_model_runs_and_matches_its_own_padding():
    cfg = fastbert.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=37, max_position_embeddings=16)
    model = fastbert.BertModel(cfg).eval()
    ids = torch.randint(1, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    padded = model(ids, attention_mask=mask).last_hidden_state
    alone = model(ids[1:, :5]).last_hidden_state
    torch.testing.assert_close(padded[1, :5], alone[0], atol=1e-5, rtol=1e-5)
    assert padded[1, 5:].abs().max() == 0  # padded positions are zeros
