"""Training: typed config, data pipeline, DeepSpeed trainer with exact resume, evaluation."""
from .config import TrainConfig, load_config
from .trainer import REQUEUE_EXIT_CODE, CollectiveTimeout, end_process, run

#: What the command-line entry points report as ``error: ...`` with exit code 2 (bad input, a file
#: system that refuses, a rank that stopped answering) instead of a traceback.
USER_ERRORS = (ValueError, OSError, CollectiveTimeout)

__all__ = ["REQUEUE_EXIT_CODE", "USER_ERRORS", "CollectiveTimeout", "TrainConfig", "end_process", "load_config",
           "run"]
