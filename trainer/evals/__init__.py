"""Evals: the IFEval registry, prompt files, scoring, contamination, the one held-out path and reports; imports core and inference."""
