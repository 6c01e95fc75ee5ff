"""The pattern language: components, their union (``Pattern``) and counting."""
from .components import (BlockLayout, Component, Dilated, Global, RandomBlocks, Strided, TopKBlocks,
                         Window, component_from_dict)
from .pattern import MAX_MASK_N, BoundPattern, Pattern, as_pattern

__all__ = ["BlockLayout", "BoundPattern", "Component", "Dilated", "Global", "MAX_MASK_N", "Pattern",
           "RandomBlocks", "Strided", "TopKBlocks", "Window", "as_pattern", "component_from_dict"]
