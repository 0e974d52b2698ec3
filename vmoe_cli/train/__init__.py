"""Training: one Accelerate loop shared by pretrain and finetune."""
