"""Distillation: heal a compressed student toward its teacher (losses, trainable formats, loop)."""

from memfit.distill.loop import AdamW8bit, distill_
from memfit.distill.losses import hidden_mse, logit_kl
from memfit.distill.trainable import make_trainable_, repack_

__all__ = ["AdamW8bit", "distill_", "hidden_mse", "logit_kl", "make_trainable_", "repack_"]
