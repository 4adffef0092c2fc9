"""Inference: loading checkpoints and generating from them; imports trainer.core only."""
