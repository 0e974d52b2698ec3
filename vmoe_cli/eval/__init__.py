"""Evaluation: FLOPs and parameter counts, few-shot probing, capacity sweeps."""
