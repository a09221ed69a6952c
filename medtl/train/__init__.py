"""The pretrain-adapt and fine-tune stages: adaptation, SSL, the training loop, domain adaptation, target images."""
