"""Structured pruning (stage 2). So far: the structural operators (:mod:`recsys_slm.prune.structure`)."""
