"""`memfit train`: memory-lean fine-tuning and distillation on FSDP2 (sharded states, activation
checkpointing, bf16, 8-bit optimizer states, compressed gradient communication), with per-rank
memory predicted next to the measured peak."""

from memfit.train.run import TrainOptions, train_to

__all__ = ["TrainOptions", "train_to"]
