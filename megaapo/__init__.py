"""megaapo: Megatron-style RL training for Qwen2.5-VL reasoning models (APO, StepGRPO and GRPO-family baselines)."""

__version__ = "0.1.0"
