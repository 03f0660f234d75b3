"""LLM rankers: a causal LM reads a prompt and the normalised P(" Yes") over the two verbalizer tokens is the score."""

from recsys_slm.ranker.verbalizer import VerbalizerScorer, verbalizer_token_ids

__all__ = ["VerbalizerScorer", "verbalizer_token_ids"]
