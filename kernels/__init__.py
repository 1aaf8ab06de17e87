"""megaapo's Triton kernels, one op per module, each with a pure-PyTorch `<op>_reference` that tests, benchmarks
and the CPU fallback use (see docs/kernels.md):

    from kernels.fused_logprob import fused_logprob            # per-token log-prob / entropy from hidden states
    from kernels.policy_loss import policy_loss                # PPO-clip + KL + aggregation over log-probs
    from kernels.fused_policy_loss import fused_policy_loss    # both, gradient made in the log-prob pass
    from kernels.group_advantage import group_advantage        # GRPO / Dr.GRPO / RLOO + DADS / STCR

The functions are deliberately not re-exported here: they share their modules' names, and binding them on the
package would shadow the modules (`import kernels.policy_loss` would then give the function).
Importable on its own (it imports nothing from `megaapo`). Set TRITON_INTERPRET=1 before the first import to run
the Triton kernels on CPU tensors; without it CPU tensors take the reference path.
"""
