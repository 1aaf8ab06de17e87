"""The learner's optimizer: gradient reduction, clipping, the Adam step and the learning-rate schedule.

Two implementations behind one small interface (`make_optimizer`, chosen by `optim.impl`):
  megatron  megatron-core's DistributedDataParallel (every gradient lands in one fp32 `main_grad` buffer, reduced
            over data-parallel ranks with a reduce-scatter) and its DistributedOptimizer (fp32 main weights and
            Adam moments sharded over data-parallel ranks, updated weights all-gathered back). This is what a
            cluster run uses (`auto` on GPU): per rank it holds 1/DP of the 12 bytes/parameter of optimizer state,
            and the fused log-prob kernels add the lm_head gradient straight into `main_grad`.
  torch     torch.optim.AdamW on every rank over replicated fp32 master copies, gradients all-reduced. The CPU
            default: simple, and what megaapo's CPU tests compare the megatron path against.
Both skip weight decay on biases and 1-D parameters (Megatron's rule), count tensor-parallel shards once and
replicated tensors once in the gradient norm, and sum data-parallel gradients (the loss is already normalised by the
global batch, so `calculate_per_token_loss` keeps megatron from dividing by DP).

Non-finite guard: `step` applies no update, on any rank, when some rank's loss or any gradient is NaN/inf, and says
so (`applied=False`). The ranks agree through a reduction before anything changes: the loss flag is all-reduced
(MAX) over every trainer rank; for torch the global gradient norm (all-reduced over TP and PP; gradients identical
over DP) is checked before clipping; for megatron its own found-inf check runs (a constant loss scale of 1 turns
it on in bf16/fp32: the main gradients are checked for inf/NaN and the flag all-reduced over the optimizer's ranks),
and its `step` then returns `update_successful=False` without touching the weights.

Owned by `megaapo.learner.Learner`; nothing else calls it.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from megaapo.models.qwen2_5_vl.weights import tp_split_of


class NonFiniteError(FloatingPointError):
    """Too many updates in a row had a NaN/inf loss or gradient (`optim.nonfinite=stop`); none was applied."""


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    return name.endswith(".bias") or param.ndim == 1


class LRSchedule:
    """lr at optimizer step k: linear warm-up over `warmup_ratio` of the run, then constant, cosine or linear decay
    to `min_lr`. The learner keeps k and checkpoints it."""

    def __init__(self, cfg, total_steps: int):
        self.cfg, self.total = cfg, total_steps
        self.warmup = int(cfg.warmup_ratio * total_steps)

    def __call__(self, step: int) -> float:
        cfg = self.cfg
        if step < self.warmup:
            return cfg.lr * (step + 1) / self.warmup
        if cfg.schedule == "constant":
            return cfg.lr
        frac = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1 - frac
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * decay


def resolve_impl(impl: str, device: torch.device) -> str:
    return ("megatron" if device.type == "cuda" else "torch") if impl == "auto" else impl


def make_optimizer(model, groups, cfg, tie_embeddings: bool):
    if resolve_impl(cfg.impl, groups.device) == "megatron":
        return MegatronOptimizer(model, groups, cfg, tie_embeddings)
    return TorchOptimizer(model, groups, cfg, tie_embeddings)


def any_rank(flag: bool, device) -> bool:
    """True on every trainer rank when `flag` is true on any (a collective over the default group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _set_lr(param_groups, lr: float) -> None:
    for group in param_groups:
        group["lr"] = lr


def _tied_embedding_copy(groups, tie_embeddings: bool):
    """With PP > 1 a tied embedding lives twice (first stage's embedding, last stage's output layer): their
    gradients must be summed over the embedding group."""
    return tie_embeddings and groups.pp_size > 1 and (groups.first_stage or groups.last_stage)


class TorchOptimizer:
    """torch.optim.AdamW, replicated on every rank; fp32 master copies when the model is in bf16/fp16."""

    name = "torch"

    def __init__(self, model, groups, cfg, tie_embeddings: bool):
        self.model, self.groups, self.cfg, self.tie = model, groups, cfg, tie_embeddings
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.master = None
        if any(p.dtype != torch.float32 for p in self.params):
            # Adam updates fp32 master copies, which are cast back after every step. Any low-precision parameter
            # decides: megatron's RMSNorm weights are fp32 in a bf16 model, and a later pipeline stage starts with one.
            self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        opt_params = self.master or self.params
        decay = [q for (n, p), q in zip(named, opt_params) if not no_weight_decay(n, p)]
        plain = [q for (n, p), q in zip(named, opt_params) if no_weight_decay(n, p)]
        param_groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in param_groups if g["params"]], lr=cfg.lr,
                                           betas=tuple(cfg.betas), eps=cfg.eps)
        self.schedule_model = model   # what megatron's forward/backward schedule runs

    def main_grad(self, param):
        return None   # gradients land in param.grad

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def finish_grads(self) -> None:
        """Tied-embedding sum over the first and last stage, then the data-parallel SUM."""
        g = self.groups
        if _tied_embedding_copy(g, self.tie):
            w = self.model.lm.shared_embedding_or_output_weight()
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            dist.all_reduce(w.grad, group=g.embd)
        if g.dp_size > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=g.dp)

    def grad_norm(self) -> float:
        """The global L2 norm: each tensor-parallel shard once, replicated tensors once, the tied copy once."""
        g = self.groups
        sq = torch.zeros((), dtype=torch.float64, device=g.device)
        tied_copy = self.tie and g.pp_size > 1 and not g.first_stage
        for name, p in self.model.named_parameters():
            if p.grad is None or not p.requires_grad:
                continue
            if tied_copy and name == "lm.output_layer.weight":
                continue   # the first stage counts the tied embedding
            if tp_split_of(name) is None and g.tp_rank != 0:
                continue   # replicated across TP: counted on TP rank 0
            sq += p.grad.double().pow(2).sum()
        if g.tp_size > 1:
            dist.all_reduce(sq, group=g.tp)
        if g.pp_size > 1:
            dist.all_reduce(sq, group=g.pp)
        return float(sq.sqrt())

    def step(self, lr: float, loss_finite: bool = True) -> tuple[bool, float]:
        """Clip, one AdamW step at `lr`, cast back to the model -> (applied, gradient norm before clipping). No
        update anywhere when any rank's loss or the norm is non-finite (see the module docstring)."""
        norm = self.grad_norm()
        if any_rank(not loss_finite or not math.isfinite(norm), self.groups.device):
            return False, norm
        clip = self.cfg.grad_clip
        if clip > 0 and norm > clip:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(clip / (norm + 1e-6))
        if self.master is not None:
            for m, p in zip(self.master, self.params):
                m.grad = p.grad.float() if p.grad is not None else None
        _set_lr(self.optimizer.param_groups, lr)
        self.optimizer.step()
        if self.master is not None:
            with torch.no_grad():
                for m, p in zip(self.master, self.params):
                    p.copy_(m)
        return True, norm

    def reset_state(self) -> None:
        self.optimizer.state.clear()

    def reload_from_model(self) -> None:
        """The model's weights were replaced: refresh the fp32 masters from them."""
        if self.master is not None:
            with torch.no_grad():
                for m, p in zip(self.master, self.params):
                    m.copy_(p)

    def sharded_state_dict(self, model_state: dict, is_loading: bool = False) -> dict:
        """AdamW's moments (and the fp32 masters of a bf16/fp16 model) as ShardedTensors shaped and sharded like the
        parameters they belong to, under megatron's optimizer keys (`optimizer.state.exp_avg.<parameter key>`), so
        they reshard with the model. The step is common to all parameters (one value in the checkpoint)."""
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            make_sharded_optimizer_tensor,
        )

        sharded = get_param_id_to_sharded_param_map(model_state, self.params)
        step = self._common_step()
        params = {}
        for i, q in enumerate(self.master or self.params):
            if is_loading:   # shapes only: loading reads into buffers of its own
                tensors = {k: torch.empty_like(q) for k in ("exp_avg", "exp_avg_sq", "fp32_param")}
            else:
                held = self.optimizer.state.get(q, {})
                # A parameter without a gradient so far has no moments yet: zeros are what Adam starts them from.
                tensors = {k: held[k] if k in held else torch.zeros_like(q) for k in ("exp_avg", "exp_avg_sq")}
                tensors["fp32_param"] = q
            if self.master is None:
                del tensors["fp32_param"]   # the model's own weights
            params[i] = {k: make_sharded_optimizer_tensor(sharded[i], t, prefix=f"optimizer.state.{k}")
                         for k, t in tensors.items()}
        return {"impl": self.name, "step": step, "params": params}

    def _common_step(self) -> int:
        steps = {int(st["step"]) for st in self.optimizer.state.values() if "step" in st}
        if len(steps) > 1:
            raise ValueError(f"AdamW's step differs between parameters ({sorted(steps)}); the checkpoint keeps one")
        return steps.pop() if steps else 0

    def load_sharded_state_dict(self, state: dict) -> None:
        """Apply what `sharded_state_dict(..., is_loading=True)` read (after the model weights are in place)."""
        _check_impl(state, self.name)
        step = int(state["step"])
        self.optimizer.state.clear()
        with torch.no_grad():
            for i, q in enumerate(self.master or self.params):
                loaded = state["params"][i]
                if self.master is not None:
                    q.copy_(loaded["fp32_param"])
                if step:   # AdamW keeps a float step tensor per parameter
                    self.optimizer.state[q] = {
                        "step": torch.tensor(float(step), dtype=torch.get_default_dtype()),
                        **{k: loaded[k].to(device=q.device, dtype=q.dtype) for k in ("exp_avg", "exp_avg_sq")}}


class MegatronOptimizer:
    """megatron-core DistributedDataParallel + DistributedOptimizer (sharded over data-parallel ranks)."""

    name = "megatron"

    def __init__(self, model, groups, cfg, tie_embeddings: bool):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides

        self.model, self.groups, self.cfg, self.tie = model, groups, cfg, tie_embeddings
        dtype = next(model.parameters()).dtype
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=True)
        # calculate_per_token_loss (set by the learner) makes megatron SUM data-parallel gradients.
        self.ddp = DistributedDataParallel(model.config, ddp_cfg, model, pg_collection=groups.pgc)
        # loss_scale=1.0: a constant grad scaler, which makes megatron check the main gradients for inf/NaN before
        # every step (it only does with a scaler) and skip the step on all ranks; scaling by 1 changes no number.
        opt_cfg = OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                                  adam_beta1=cfg.betas[0], adam_beta2=cfg.betas[1], adam_eps=cfg.eps,
                                  clip_grad=cfg.grad_clip, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                                  params_dtype=dtype, use_distributed_optimizer=True, loss_scale=1.0)
        # The standard overrides are megatron's no-weight-decay rule for biases and 1-D parameters.
        self.optimizer = get_megatron_optimizer(opt_cfg, [self.ddp], get_standard_config_overrides(opt_cfg),
                                                pg_collection=groups.pgc, use_gloo_process_groups=False)
        for part in self._parts():
            _fix_param_order(part)
        self.schedule_model = self.ddp

    def _parts(self) -> list:
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    def main_grad(self, param):
        """The fp32 buffer megatron reduces: fused kernels add the lm_head gradient into it directly."""
        return getattr(param, "main_grad", None)

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def finish_grads(self) -> None:
        """Tied-embedding sum over the first and last stage, then megatron's data-parallel reduce-scatter."""
        if _tied_embedding_copy(self.groups, self.tie):
            dist.all_reduce(self.model.lm.shared_embedding_or_output_weight().main_grad, group=self.groups.embd)
        self.ddp.finish_grad_sync()

    def step(self, lr: float, loss_finite: bool = True) -> tuple[bool, float]:
        """megatron's step at `lr` -> (applied, gradient norm); not applied when any rank's loss is non-finite or
        megatron's found-inf check sees an inf/NaN gradient (then the norm is NaN: megatron does not compute it)."""
        if any_rank(not loss_finite, self.groups.device):
            return False, math.nan
        # megatron's groups carry multipliers that its own scheduler (not used here) applies at every step.
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.cfg.weight_decay * group.get("wd_mult", 1.0)
        ok, norm, _ = self.optimizer.step()
        if not ok:
            return False, math.nan
        return True, float(norm)

    def reset_state(self) -> None:
        for part in self._parts():
            part.optimizer.state.clear()

    def reload_from_model(self) -> None:
        self.optimizer.reload_model_params()

    def sharded_state_dict(self, model_state: dict, is_loading: bool = False) -> dict:
        """megatron's own sharded state dict in its `fully_reshardable` format: fp32 main params and Adam moments
        gathered over data-parallel ranks into model-shaped tensors keyed like the model's, so a checkpoint loads at
        any TP x PP x DP (the dp-only `dp_reshardable` format would tie it to one TP x PP)."""
        if is_loading:
            self._init_state()
        metadata = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True,
                    "dp_cp_group": self.groups.dp}
        return {"impl": self.name,
                "state": self.optimizer.sharded_state_dict(model_state, is_loading, metadata=metadata)}

    def _init_state(self) -> None:
        """Give every parameter Adam state to load into. megatron's init_state_fn leaves out torch Adam's `step`,
        without which DistributedOptimizer.state_dict() (called while building the loading state dict) fails."""
        for part in self._parts():
            opt = part.optimizer
            for group in opt.param_groups:
                for p in group["params"]:
                    if not opt.state[p]:
                        opt.state[p].update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p),
                                            step=torch.tensor(0.0))

    def load_sharded_state_dict(self, state: dict) -> None:
        _check_impl(state, self.name)
        with _torch_adam_step_kept(self._parts()):
            self.optimizer.load_state_dict(state["state"])
        for part in self._parts():
            # megatron hands one step tensor to every parameter; torch Adam increments each parameter's step in
            # place, so a shared one would advance by the number of parameters at every update.
            for st in part.optimizer.state.values():
                st["step"] = st["step"].clone()


def _fix_param_order(part) -> None:
    """megatron-core 0.16.1: a parameter group holding fp32 and bf16/fp16 parameters (a bf16 model whose norms
    megatron keeps in fp32: the local layer spec without Apex) is handed to Adam as [fp32 ..., fp16 ...], but
    `model_param_group_index_map` keeps the group's original order; checkpointing then pairs parameters with another
    parameter's main weights and moments (a shape error at best). Point the map at the order Adam really has."""
    for g, (fp32, half) in enumerate(zip(part.model_fp32_groups, part.model_float16_groups, strict=True)):
        for i, p in enumerate([*fp32, *half]):
            part.model_param_group_index_map[p] = (g, i)


@contextlib.contextmanager
def _torch_adam_step_kept(parts: list):
    """megatron-core 0.16.1 with torch's Adam (no Apex / Transformer Engine): loading the `fully_reshardable` format
    copies every state tensor of a parameter from the checkpoint's, which has no `step` (kept in param_groups), and
    fails with KeyError('step'). Within the block, state absent from the checkpoint keeps its current value."""
    for part in parts:
        setter = part._set_main_param_and_optimizer_states

        def keep_missing(model_param, tensors, _set=setter, _part=part):
            held = _part._get_main_param_and_optimizer_states(model_param)
            _set(model_param, {**{k: v for k, v in held.items() if k not in tensors}, **tensors})

        part._set_main_param_and_optimizer_states = keep_missing
    try:
        yield
    finally:
        for part in parts:
            del part._set_main_param_and_optimizer_states


def _check_impl(state: dict, impl: str) -> None:
    saved = state.get("impl", "torch")
    if saved != impl:
        raise ValueError(f"checkpoint's optimizer state was written by optim.impl={saved}, this run uses "
                         f"optim.impl={impl}: set optim.impl={saved} to resume it")
