"""Reproduction harnesses: the paper's Table 5 (detection) and classification tables."""
