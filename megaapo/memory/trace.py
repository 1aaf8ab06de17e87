"""One training step of one learner rank, run on fake tensors at real shapes: nothing is allocated, every storage is
counted (`megaapo.memory.tracker`), in a fake TP x PP x DP world (`megaapo.memory.world`).

What runs is megaapo's own code: `Learner` builds megatron-core's Qwen2.5-VL stage through our model adapter, its
optimizer (megatron's DDP buffers + DistributedOptimizer, or torch AdamW), then the step's passes in train.py's
order: reference log-probs, old-policy log-probs (when the loss needs them), and `Learner.train_step` with the RL
loss of train.py (micro-batches through megatron's forward/backward schedule, 1F1B for PP > 1, then the optimizer
step). Adam's moments are made before the step, as a previous step would have left them.

Called by `megaapo.memory.plan` (one spawned process per traced stage) and, with real tensors, by
`benchmarks/memory_plan.py` to measure the same calls.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch

from megaapo.memory.tracker import StorageTracker
from megaapo.memory.world import as_on_gpu, fake_world, faked, host_side, no_init


@dataclass(frozen=True)
class StepShape:
    """The micro-batches one data-parallel replica trains on, worst case by the config (see `step_shape`)."""
    prompt_tokens: int
    response_tokens: int
    images: int                 # per sample, each `image_tokens` tokens of the prompt
    image_tokens: int
    samples_per_microbatch: int
    microbatches: int           # traced (enough to reach the schedule's steady state)
    microbatches_per_update: int
    packing: bool

    @property
    def seq_len(self) -> int:
        return self.prompt_tokens + self.response_tokens


@dataclass
class RankTrace:
    stage: int
    peak: int                   # bytes a caching allocator would report as max allocated
    peak_phase: str
    peak_split: dict            # category -> bytes live at the peak
    phases: dict                # phase -> its own peak
    resident: dict              # category -> bytes live after the step (held between steps)
    category_peaks: dict        # category -> its own largest total during the step
    seconds: float
    value_reads: int = 0
    bounded_shapes: int = 0
    notes: list = field(default_factory=list)


def step_shape(cfg, dp: int, pp: int) -> StepShape:
    """The worst micro-batch the config allows: every sample as long as a prompt and a response can be (or the
    engine's context), each prompt with its maximum number of largest images; as many samples per micro-batch as the
    token budget takes. Traced: enough micro-batches to fill the pipeline (PP) and accumulate a gradient (2)."""
    r, d, p = cfg.rollout, cfg.data, cfg.parallel
    response = r.max_new_tokens
    prompt = d.max_prompt_tokens
    if r.max_model_len:
        prompt = max(1, min(prompt, r.max_model_len - response))
    images = r.max_images_per_prompt
    per_image = d.max_pixels // (28 * 28)   # merged 2x2 patches of 14 px
    image_tokens = min(per_image, (prompt - 8) // images) if images else 0
    if image_tokens < 4:
        images, image_tokens = 0, 0
    per_mb = max(1, p.micro_batch_tokens // (prompt + response))
    samples = math.ceil(r.prompts_per_step * r.n_samples / cfg.algo.updates_per_batch / dp)
    per_update = math.ceil(samples / per_mb)
    return StepShape(prompt_tokens=prompt, response_tokens=response, images=images, image_tokens=image_tokens,
                     samples_per_microbatch=per_mb, microbatches=min(per_update, max(2, pp)),
                     microbatches_per_update=per_update, packing=p.sequence_packing)


def build_samples(hf_cfg, shape: StepShape) -> list:
    """The traced micro-batches' samples: real ids, mrope positions and image grids, uninitialised pixels, one set
    per sample (the vision tower then encodes every sample's images, as when no two samples share a prompt)."""
    from megaapo.data.packing import Sample
    from megaapo.models.qwen2_5_vl.config import lm_shape
    from megaapo.models.qwen2_5_vl.rope import mrope_positions

    sh = lm_shape(hf_cfg)
    ids = torch.zeros(shape.seq_len, dtype=torch.long)
    grid = None
    if shape.images:
        side = max(1, int(math.sqrt(shape.image_tokens)))
        grid = torch.tensor([[1, 2 * side, 2 * (shape.image_tokens // side)]] * shape.images)
        n = int(grid[0, 1] * grid[0, 2]) // 4
        for k in range(shape.images):
            ids[2 + k * (n + 2): 2 + k * (n + 2) + n] = sh.image_token_id
    pos = mrope_positions(ids, grid, image_token_id=sh.image_token_id, spatial_merge_size=sh.spatial_merge_size,
                          video_token_id=sh.video_token_id, prompt_len=shape.prompt_tokens)
    patches = 0 if grid is None else int(grid.prod(-1).sum())
    pixel_row = 3 * 2 * 14 * 14   # channels x temporal patch x patch x patch, as the image processor gives them
    return [Sample(input_ids=ids, prompt_len=shape.prompt_tokens, position_ids=pos, image_grid_thw=grid,
                   pixel_values=torch.empty(patches, pixel_row) if grid is not None else None,
                   image_token_id=sh.image_token_id)
            for _ in range(shape.samples_per_microbatch * shape.microbatches)]


def rl_loss(cfg, samples):
    """train.py's RL loss over a synthetic batch of these samples (values irrelevant, shapes real) -> (loss, whether
    the step needs old-policy log-probs)."""
    from megaapo.algos.losses import LossSettings
    from megaapo.experience import Experience, RLLoss

    n = len(samples)
    lens = [s.response_len for s in samples]
    zeros = [torch.zeros(k) for k in lens]
    exp = Experience(samples=samples, group=torch.arange(n) // max(1, cfg.rollout.n_samples),
                     rewards=torch.zeros(n), components={}, correct=torch.zeros(n, dtype=torch.bool),
                     lengths=torch.tensor(lens, dtype=torch.float32), rollout_logp=zeros,
                     advantages=torch.ones(n), kl_weight=torch.ones(n), adv_multiplier=torch.ones(n),
                     keep=torch.ones(n, dtype=torch.bool), truncated=torch.zeros(n, dtype=torch.bool))
    settings = LossSettings.from_config(cfg.algo, cfg.rollout.max_new_tokens)
    needs_old = cfg.algo.updates_per_batch > 1 or cfg.rollout.tis_cap > 0
    old = zeros if needs_old else None
    ref = zeros if cfg.algo.kl_coef > 0 else None
    return RLLoss(exp, list(range(n)), settings, old, ref, cfg.rollout.tis_cap), needs_old


def optim_config(cfg, target: str):
    """optim.impl=auto resolved for the target device (megatron's distributed optimizer on GPU)."""
    impl = cfg.optim.impl
    if impl == "auto":
        impl = "megatron" if target == "cuda" else "torch"
    return replace(cfg.optim, impl=impl)


def run_step(cfg, hf_cfg, groups, samples, target: str, tracker: StorageTracker | None = None,
             one_call_vision: bool = True) -> None:
    """Build the policy (and reference) learner on `groups` and run one RL step's learner work in train.py's
    order. On fake tensors under a tracker (the plan) or on real ones (the benchmark's measured run)."""
    from megaapo.learner import Learner

    track = tracker or StorageTracker()   # unused categories on a real run: the same calls either way
    T = cfg.rollout.temperature
    # forward-only passes free each micro-batch before the next: one shows their peak (the update needs two)
    one = samples[:max(1, cfg.parallel.micro_batch_tokens // int(samples[0].input_ids.shape[0]))]
    with track.category("other"), track.phase("build"), no_init():   # parameters are re-charged below
        policy = Learner(None, groups, cfg.model, cfg.parallel, optim_config(cfg, target),
                         total_steps=cfg.trainer.total_steps, hf_config=hf_cfg)
    policy._dp_share = lambda batch: list(range(len(batch)))   # it is handed its replica's samples
    as_on_gpu(policy, target, one_call_vision)
    _categorise(track, policy)
    with host_side():
        loss, needs_old = rl_loss(cfg, samples)
    with track.category("optimizer"):
        adam_state(policy.optim)
    policy.optim.step = _in_phase(track, "optimizer step", policy.optim.step)
    reference = None
    if cfg.algo.kl_coef > 0:
        with track.phase("reference log-probs"):
            with track.category("other"), no_init():
                reference = Learner(None, groups, cfg.model, cfg.parallel, None, hf_config=hf_cfg)
            track.recategorise(reference.model.parameters(), "reference weights")
            reference._dp_share = policy._dp_share
            as_on_gpu(reference, target, one_call_vision)
            with track.category("activations"):
                reference.logprobs(one, T)
        if cfg.model.ref_offload and target == "cuda":
            reference = None   # its weights go back to the host after the pass
    if needs_old and cfg.algo.old_logprob == "learner":
        with track.phase("old log-probs"), track.category("activations"):
            policy.logprobs(one, T)
    with track.phase("train step"), track.category("activations"):
        policy.train_step(samples, loss, T, entropy=True)
    track.resident = {k: v for k, v in track.by_category.items() if v > 0}


def adam_state(optim) -> None:
    """Adam's moments as torch's AdamW makes them at its first step (they stay from then on), so that the traced
    step is a steady-state one. Both optimizers run torch AdamW (megatron's without TE or Apex installed)."""
    inner = [part.optimizer for part in optim._parts()] if optim.name == "megatron" else [optim.optimizer]
    for opt in inner:
        for group in opt.param_groups:
            for p in group["params"]:
                with host_side():   # AdamW keeps its step count on the host
                    step = torch.tensor(0.0)
                opt.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def _categorise(tracker: StorageTracker, learner) -> None:
    """Charge the learner's lasting tensors to what they are: megatron's DDP moved the weights into a buffer of its
    own and made the fp32 grad buffer; the optimizer made fp32 main copies. What else the build left (the rotary
    frequency buffers, a few scalars) stays "other"."""
    params = list(learner.model.parameters())
    tracker.recategorise(params, "weights")
    tracker.recategorise([getattr(p, "main_grad", None) for p in params], "grads")
    if learner.optim.name == "megatron":
        weights = {id(p.untyped_storage()) for p in params}   # fp32 parameters are their own main copies
        mains = [q for part in learner.optim._parts() for g in part.optimizer.param_groups for q in g["params"]]
        tracker.recategorise([q for q in mains if id(q.untyped_storage()) not in weights], "optimizer")
    elif learner.optim.master is not None:
        tracker.recategorise(learner.optim.master, "optimizer")
    for p in params:   # torch's optimizer: .grad tensors appear during the backward
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda q: tracker.recategorise([q.grad], "grads"))


def _in_phase(tracker: StorageTracker, name: str, fn):
    def wrapped(*args, **kwargs):
        with tracker.phase(name), tracker.category(name):
            return fn(*args, **kwargs)
    return wrapped


def trace_rank(cfg, hf_cfg, tp: int, pp: int, dp: int, stage: int, shape: StepShape,
               target: str = "cuda") -> RankTrace:
    """The peak memory of pipeline stage `stage`'s representative rank over one step (fake tensors, no device)."""
    t0 = time.perf_counter()
    tracker = StorageTracker(block=512 if target == "cuda" else 1)
    samples = build_samples(hf_cfg, shape)
    rows = 1 if shape.packing else shape.samples_per_microbatch
    hidden = [shape.seq_len * shape.samples_per_microbatch // rows, rows, hf_cfg.text_config.hidden_size]
    with fake_world(tp, pp, dp, stage, hidden) as groups, faked(target, tracker):
        run_step(cfg, hf_cfg, groups, samples, target, tracker)
    return RankTrace(stage=stage, peak=tracker.peak.total, peak_phase=tracker.peak.phase,
                     peak_split=tracker.peak.by_category, phases=dict(tracker.phase_peaks), resident=tracker.resident,
                     category_peaks=dict(tracker.category_peaks),
                     seconds=time.perf_counter() - t0, value_reads=tracker.value_reads,
                     bounded_shapes=tracker.bounded_shapes)
