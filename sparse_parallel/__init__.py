"""sparse-parallel: sparse attention on million-token contexts across many GPUs."""
from .api import sparse_attention
from .parallel import SequenceParallel, comm_volume, shard
from .patterns import (BlockLayout, Dilated, Documents, Global, Pattern, RandomBlocks, Strided, TopKBlocks,
                       Window)

__version__ = "0.1.0"

__all__ = ["BlockLayout", "Dilated", "Documents", "Global", "Pattern", "RandomBlocks", "SequenceParallel", "Strided",
           "TopKBlocks", "Window", "comm_volume", "shard", "sparse_attention"]
