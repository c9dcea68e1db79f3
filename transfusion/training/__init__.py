"""Training: one optimizer step (``step``), the loop with checkpoints and resume (``loop``), what a run
is built from (``setup``), and the image autoencoder's own training (``vae``)."""

from transfusion.training.loop import SAMPLE_PROMPTS, train, validate
from transfusion.training.setup import build_model, check_consistency, image_encoder
from transfusion.training.step import (
    BadSteps,
    StepResult,
    TrainingStopped,
    lr_at,
    make_optimizer,
    train_step,
    warmup_cosine,
)

__all__ = [
    "SAMPLE_PROMPTS",
    "BadSteps",
    "StepResult",
    "TrainingStopped",
    "build_model",
    "check_consistency",
    "image_encoder",
    "lr_at",
    "make_optimizer",
    "train",
    "train_step",
    "validate",
    "warmup_cosine",
]
