"""Evaluation: the `eval` stage (stage.py), its samplers, FID, CLIP score, fidelity, diversity."""
