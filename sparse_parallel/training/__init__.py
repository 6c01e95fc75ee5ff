"""Training: typed config, data pipeline, DeepSpeed trainer with exact resume, evaluation."""
from .config import TrainConfig, load_config
from .trainer import REQUEUE_EXIT_CODE, run

__all__ = ["REQUEUE_EXIT_CODE", "TrainConfig", "load_config", "run"]
