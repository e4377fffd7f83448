"""Pre-training (masked LM + next sentence prediction) and fine-tuning helpers."""
