"""Model code: the tiny checkpoint builder (and, later, the megatron-core Qwen2.5-VL)."""
