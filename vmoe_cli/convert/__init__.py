"""Official JAX V-MoE checkpoints -> vmoe checkpoints, and the check against the official outputs."""
