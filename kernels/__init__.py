"""megaapo's Triton kernels: fused log-prob, policy loss and group advantage, each with a PyTorch reference.

Importable on its own (it imports nothing from `megaapo`).
"""
