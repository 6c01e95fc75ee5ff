"""The decoder-only language model; parallelism is applied from outside."""
from .layers import Attention, Block, RMSNorm, SwiGLU, apply_rotary, rotary_tables
from .transformer import IGNORE_INDEX, Transformer, apply_sequence_parallel, mlp_hidden

__all__ = ["Attention", "Block", "IGNORE_INDEX", "RMSNorm", "SwiGLU", "Transformer", "apply_rotary",
           "apply_sequence_parallel", "mlp_hidden", "rotary_tables"]
