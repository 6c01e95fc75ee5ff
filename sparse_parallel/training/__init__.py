"""Training: typed config, data pipeline, DeepSpeed trainer with exact resume, evaluation."""
from .config import TrainConfig, load_config
from .trainer import REQUEUE_EXIT_CODE, end_process, run

__all__ = ["REQUEUE_EXIT_CODE", "TrainConfig", "end_process", "load_config", "run"]
