"""The pattern language: components, their union (``Pattern``), documents it may be restricted to,
its compiled form and counting."""
from .bound import BoundPattern
from .components import BlockLayout, Dilated, Global, RandomBlocks, Strided, TopKBlocks, Window
from .documents import Documents
from .pattern import MAX_MASK_N, Component, Pattern, as_pattern, component_from_dict

__all__ = ["BlockLayout", "BoundPattern", "Component", "Dilated", "Documents", "Global", "MAX_MASK_N", "Pattern",
           "RandomBlocks", "Strided", "TopKBlocks", "Window", "as_pattern", "component_from_dict"]
