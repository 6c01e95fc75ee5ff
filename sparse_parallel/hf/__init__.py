"""Hugging Face interop: the transformers attention plug-in and Llama-style folders in and out.

Needs the ``hf`` extra (transformers, safetensors); nothing here downloads anything.
"""
from .attention import NAME, apply_sequence_parallel, layer_pattern, register, sparse_attention_forward
from .convert import (from_hf_state_dict, half_to_interleaved, hf_config, interleaved_to_half,
                      model_config_from_hf, read_hf_folder, to_hf_state_dict, write_hf_folder)

__all__ = ["NAME", "apply_sequence_parallel", "from_hf_state_dict", "half_to_interleaved", "hf_config",
           "interleaved_to_half", "layer_pattern", "model_config_from_hf", "read_hf_folder", "register",
           "sparse_attention_forward", "to_hf_state_dict", "write_hf_folder"]
