"""Llama-style GPT model with upstream Megatron-DeepSpeed parameter names."""

from megatron.model.gpt import GPTConfig, GPTModel

__all__ = ["GPTConfig", "GPTModel"]
