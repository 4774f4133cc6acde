"""megatron-alp: Adaptive Layerwise Perturbation (ALP) for LLM RL on Megatron-Core."""

__version__ = "0.1.0"
