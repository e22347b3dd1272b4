"""The embedded default: the built-in arithmetic task, the tiny character-level model, and its warm-up SFT."""
