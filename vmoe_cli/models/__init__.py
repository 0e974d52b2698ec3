"""Models: ViT and V-MoE (ground floor: imports nothing above `vmoe_cli.models`)."""
