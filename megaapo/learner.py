"""The learner: a megatron-core Qwen2.5-VL that scores sequences (forward-only log-probs) and trains on them.

Owned by train.py (policy and reference), sft and `megaapo check parity`. Everything here runs on every trainer
rank; each rank holds its tensor/pipeline shard of the model, and megatron-core's pipeline schedule moves
activations between stages. Results that need the lm_head (log-probs, losses, metrics) exist on the last pipeline
stage only; other stages return None.

Data parallelism: every rank is handed the whole batch; each data-parallel replica takes its share of the samples
(split by tokens, the same on every rank), so the gradients it makes add up, over the DP reduction, to the whole
batch's. Forward-only log-probs are shared back over the DP group.

One training step, in order:
  1. take this replica's share of the samples; pack it into micro-batches by token budget (megaapo.data.packing;
     a packed row's sample boundaries reach the attention as megatron's PackedSeqParams)
  2. forward/backward every micro-batch through megatron's schedule (1F1B for PP > 1); the loss of a micro-batch is
     the caller's `loss_fn` applied to its response log-probs, already normalised by the global batch, so gradients
     simply add up; on GPU a loss_fn with a fused form (`megaapo.experience.RLLoss`) runs as one
     `kernels.fused_policy_loss` call instead, which makes the loss gradient inside the log-prob pass
  3. finish gradients: tied embedding (first + last stage) and the data-parallel reduction
  4. clip by the global gradient norm (each tensor-parallel shard counted once, replicated tensors once)
  5. Adam step on fp32 main weights at the scheduled learning rate (megaapo.optim: megatron-core's DDP buffers and
     distributed optimizer on GPU, torch AdamW on CPU) -- unless some rank's loss or a gradient is NaN/inf: then
     no rank updates anything (not the weights, not Adam's state, not the schedule), the update is counted as
     skipped, and `optim.nonfinite=stop` ends the run after `optim.nonfinite_patience` such updates in a row
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from megaapo.data.packing import MicroBatch, Sample, pack
from megaapo.models.logprob import token_logprobs
from megaapo.models.qwen2_5_vl.config import load_hf_config
from megaapo.models.qwen2_5_vl.model import Qwen25VLModel
from megaapo.models.qwen2_5_vl.rope import mrope_positions
from megaapo.models.qwen2_5_vl.weights import HFReader, full_shape, gather_tp, load_into, to_hf, tp_split_of
from megaapo.optim import LRSchedule, NonFiniteError, make_optimizer

log = logging.getLogger(__name__)

# loss_fn(logp [n, R], entropy [n, R] | None, mask [n, R], rows) -> (scalar loss normalised by the *global* batch,
# metrics). Row i holds the response log-probs of sample rows[i] (an index into train_step's `samples`), right-padded
# (mask False) to the longest response. Metrics are this micro-batch's *contributions*, normalised like the loss, so
# the batch's value is their sum over micro-batches and data-parallel ranks; keys ending in "_max" are maxima.
LossFn = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, list], tuple]


@dataclass
class StepResult:
    metrics: dict            # averaged over micro-batches (last stage); grad_norm and lr everywhere
    num_microbatches: int


class Learner:
    def __init__(self, hf_path, groups, model_cfg, parallel_cfg, optim_cfg=None, *, total_steps: int = 1,
                 load_weights: bool = True, hf_config=None):
        """load_weights=False: only the model's config is read from hf_path; the weights are left unset for a
        checkpoint to fill (`load_sharded_state_dict`). hf_config: build this config's shapes and leave the weights
        uninitialised instead of reading hf_path (the memory planner traces such a learner with fake tensors;
        benchmarks time one)."""
        self.groups, self.parallel = groups, parallel_cfg
        from megaapo.convert import MCORE_META, load_mcore_into

        src = Path(hf_path) if hf_config is None else None
        sharded = src is not None and (src / MCORE_META).is_file()   # an `megaapo convert hf-to-mcore` directory
        self.hf_dir = src / "hf" if sharded else src
        self.hf_config = load_hf_config(self.hf_dir) if hf_config is None else hf_config
        self.model = Qwen25VLModel(self.hf_config, groups, dtype=model_cfg.dtype, attention=model_cfg.attention,
                                   recompute=model_cfg.recompute).to(groups.device)
        self.shape = self.model.shape
        # Losses arrive already normalised by the global batch: megatron must not rescale them per micro-batch.
        self.model.config.calculate_per_token_loss = True
        if load_weights and sharded:
            load_mcore_into(self.model, src, groups.tp_size, groups.tp_rank, groups.pp_size, groups.pp_rank)
        elif load_weights and src is not None:
            load_into(self.model, HFReader(src), self.shape, groups.tp_size, groups.tp_rank)
        if model_cfg.freeze_vision and self.model.vision is not None:
            self.model.vision.requires_grad_(False)
        self.offload = model_cfg.ref_offload and optim_cfg is None and groups.device.type == "cuda"
        self.optim = None
        if optim_cfg is not None:
            self.optim = make_optimizer(self.model, groups, optim_cfg, self.shape.tie_embeddings)
            self.lr_schedule = LRSchedule(optim_cfg, total_steps)
            self.lr_step = 0   # optimizer steps taken on the schedule
            self.skipped_in_a_row = 0   # updates not applied for a NaN/inf loss or gradient, since the last applied
        else:
            self.model.requires_grad_(False)
            self.model.eval()
            if self.offload:
                self.model.to("cpu")
        self.version = 0

    # ------------------------------------------------------------------ batches
    def make_sample(self, input_ids, prompt_len, pixel_values=None, image_grid_thw=None,
                    prompt_positions=None) -> Sample:
        """prompt_positions: the mrope positions of this prompt when known (the G samples of a group share it);
        the response is text, so its positions just continue after the prompt's largest one."""
        if prompt_positions is not None and prompt_positions.shape[1] == prompt_len:
            start = int(prompt_positions.max()) + 1 if prompt_len else 0
            response = torch.arange(start, start + int(input_ids.shape[0]) - prompt_len).expand(3, -1)
            pos = torch.cat([prompt_positions, response], dim=1)
        else:
            pos = mrope_positions(input_ids, image_grid_thw, image_token_id=self.shape.image_token_id,
                                  spatial_merge_size=self.shape.spatial_merge_size,
                                  video_token_id=self.shape.video_token_id, prompt_len=prompt_len)
        return Sample(input_ids=input_ids, prompt_len=prompt_len, position_ids=pos, pixel_values=pixel_values,
                      image_grid_thw=image_grid_thw, image_token_id=self.shape.image_token_id)

    def _run(self, mbs: list[MicroBatch], loss_of: Callable, forward_only: bool) -> list:
        """megatron's forward/backward schedule over the micro-batches; returns loss_of's reports (last stage)."""
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
        from megatron.core.pipeline_parallel.schedules import get_forward_backward_func

        dev = self.groups.device

        def step(data_iter, model):
            mb = next(data_iter)
            packed = self.model.packed_seq_params(mb.cu_seqlens, mb.max_seqlen, dev) \
                if mb.cu_seqlens is not None else None
            pix = mb.pixel_values.to(dev) if mb.pixel_values is not None else None
            grid = mb.image_grid_thw.to(dev) if mb.image_grid_thw is not None else None
            img = mb.image_mask.to(dev) if mb.image_mask is not None else None
            out = model(mb.input_ids.to(dev), mb.position_ids.to(dev), packed, pix, grid, img, mb.feature_index)
            return out, partial(loss_of, mb)

        fb = get_forward_backward_func(pp_size=self.groups.pp_size)
        model = self.optim.schedule_model if self.optim is not None else self.model   # megatron's DDP wrapper
        kwargs = dict(forward_step_func=step, data_iterator=iter(mbs), model=[model],
                      num_microbatches=len(mbs), seq_length=max(mb.num_tokens for mb in mbs), micro_batch_size=1,
                      forward_only=forward_only, pg_collection=self.groups.pgc)
        if self.groups.pp_size > 1:
            kwargs["p2p_communicator"] = P2PCommunicator(self.groups.pp, self.model.config)
        return fb(**kwargs)

    def _response_logprobs(self, hidden, mb: MicroBatch, temperature: float, entropy: bool):
        """Hidden [T, b, h] of one micro-batch -> (logp [n, R], entropy [n, R] | None, mask [n, R])."""
        flat = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])   # row-major, as response_spans count
        idx = torch.cat([torch.arange(a, b) for a, b in mb.response_spans]).to(flat.device)
        weight = self.model.output_weight()
        lp, ent = token_logprobs(flat.index_select(0, idx), weight,
                                 mb.labels.reshape(-1).to(flat.device).index_select(0, idx), temperature=temperature,
                                 tp_group=self.groups.tp if self.groups.tp_size > 1 else None, entropy=entropy,
                                 main_grad=self._main_grad(weight))
        lens = [b - a for a, b in mb.response_spans]
        width = max(lens)
        mask = torch.zeros(len(lens), width, dtype=torch.bool, device=flat.device)
        for i, n in enumerate(lens):
            mask[i, :n] = True
        out = lp.new_zeros(len(lens), width).masked_scatter(mask, lp)
        ent_out = ent.new_zeros(len(lens), width).masked_scatter(mask, ent) if entropy else None
        return out, ent_out, mask

    def _fused_loss(self, hidden, mb: MicroBatch, rows: list, loss_fn, temperature: float, entropy: bool):
        """The micro-batch's (loss, metrics) from `kernels.fused_policy_loss` (the loss gradient made inside the
        log-prob pass: 6NHV FLOPs, no logits recomputed), or None where the fused path does not apply: a loss_fn
        without the fused form (see `megaapo.experience.RLLoss`), CPU tensors (unless MEGAAPO_TRITON=1, the
        interpreter tests), MEGAAPO_TRITON=0, or hidden and lm_head in different dtypes."""
        flag = os.environ.get("MEGAAPO_TRITON", "")
        weight = self.model.output_weight()
        if not hasattr(loss_fn, "fused_inputs") or flag == "0" or not (hidden.is_cuda or flag == "1") \
                or hidden.dtype != weight.dtype:
            return None
        lens = [b - a for a, b in mb.response_spans]
        inputs = loss_fn.fused_inputs(rows, lens, entropy, hidden.device)
        if inputs is None:
            return None
        from kernels.fused_policy_loss import fused_policy_loss

        flat = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])   # row-major, as response_spans count
        idx = torch.cat([torch.arange(a, b) for a, b in mb.response_spans]).to(flat.device)
        labels = mb.labels.reshape(-1).to(flat.device).index_select(0, idx)
        # Under TP the kernel all-reduces the hidden-state gradient over the group itself (reduce_grad_hidden), as
        # copy_to_tensor_model_parallel_region does on the unfused path: megatron's output layer is bypassed.
        loss, metrics, logp = fused_policy_loss(
            flat.index_select(0, idx), weight, labels, **inputs, temperature=temperature, with_entropy=entropy,
            tp_group=self.groups.tp if self.groups.tp_size > 1 else None, main_grad=self._main_grad(weight),
            return_logp=True)
        return loss, loss_fn.fused_metrics(metrics, logp, rows, lens, inputs["mask"])

    def _dp_share(self, samples: list[Sample]) -> list[int]:
        """Indices of the samples this data-parallel replica processes: longest first, each to the replica with the
        fewest tokens so far (deterministic, so every rank computes the same split)."""
        g = self.groups
        if g.dp_size == 1:
            return list(range(len(samples)))
        load, mine = [0] * g.dp_size, []
        for i in sorted(range(len(samples)), key=lambda i: -int(samples[i].input_ids.shape[0])):
            r = min(range(g.dp_size), key=lambda r: load[r])
            load[r] += int(samples[i].input_ids.shape[0])
            if r == g.dp_rank:
                mine.append(i)
        return sorted(mine)

    def _reduce_metrics(self, reports: list[dict]) -> dict:
        """Sum (max for "_max" keys) of the micro-batch contributions over micro-batches and DP replicas."""
        def merge(into: dict, item: dict) -> dict:
            for k, v in item.items():
                into[k] = max(into.get(k, v), v) if k.endswith("_max") else into.get(k, 0.0) + v
            return into

        total: dict = {}
        for r in reports:
            merge(total, r)
        if self.groups.dp_size > 1:
            parts = [None] * self.groups.dp_size
            dist.all_gather_object(parts, total, group=self.groups.dp)
            total = {}
            for part in parts:
                merge(total, part)
        return total

    def _main_grad(self, weight):
        """Where the kernels put the lm_head gradient: megatron's fp32 main_grad buffer when training with it."""
        return self.optim.main_grad(weight) if self.optim is not None and torch.is_grad_enabled() else None

    # ------------------------------------------------------------------ public passes
    @torch.no_grad()
    def logprobs(self, samples: list[Sample], temperature: float = 1.0, entropy: bool = False):
        """Forward-only response log-probs per sample (last stage; None elsewhere): list of [response_len] fp32."""
        if self.offload:
            self.model.to(self.groups.device)
        self.model.eval()
        mine = self._dp_share(samples)
        results: dict[int, tuple] = {}

        def loss_of(mb, hidden):
            lp, ent, mask = self._response_logprobs(hidden, mb, temperature, entropy)
            for i, r in enumerate(mb.rows):
                n = int(mask[i].sum())
                results[mine[r]] = (lp[i, :n].cpu(), ent[i, :n].cpu() if entropy else None)
            return hidden.new_zeros(()), torch.tensor(1), {}

        if mine:
            self._run(pack([samples[i] for i in mine], self.parallel.micro_batch_tokens,
                           self.parallel.sequence_packing), loss_of, True)
        if self.offload:
            self.model.to("cpu")
        if not self.groups.last_stage:
            return None
        if self.groups.dp_size > 1:   # every replica gets every sample's log-probs
            parts = [None] * self.groups.dp_size
            dist.all_gather_object(parts, results, group=self.groups.dp)
            results = {k: v for part in parts for k, v in part.items()}
        lps = [results[i][0] for i in range(len(samples))]
        return (lps, [results[i][1] for i in range(len(samples))]) if entropy else lps

    def train_step(self, samples: list[Sample], loss_fn: LossFn, temperature: float = 1.0,
                   entropy: bool = False, lr: float | None = None) -> StepResult:
        """One optimizer update over all samples (gradient accumulation over packed micro-batches).

        lr: a fixed learning rate for this update that leaves the schedule where it is (supervised warm-up)."""
        self.model.train()
        self.optim.zero_grad()
        mine = self._dp_share(samples)
        reports: list[dict] = []
        finite = [True]

        def loss_of(mb, hidden):
            rows = [mine[r] for r in mb.rows]
            fused = self._fused_loss(hidden, mb, rows, loss_fn, temperature, entropy)
            if fused is not None:
                loss, metrics = fused
            else:
                lp, ent, mask = self._response_logprobs(hidden, mb, temperature, entropy)
                loss, metrics = loss_fn(lp, ent, mask, rows)
            reports.append({k: float(v) for k, v in metrics.items()})
            finite[0] &= math.isfinite(float(loss.detach()))
            return loss, torch.tensor(1), {}

        mbs = pack([samples[i] for i in mine], self.parallel.micro_batch_tokens, self.parallel.sequence_packing)
        if mbs:   # a replica left without samples still joins the gradient reduction, with zeros
            self._run(mbs, loss_of, False)
        self.optim.finish_grads()
        scheduled = lr is None
        if scheduled:
            lr = self.lr_schedule(self.lr_step)
        applied, grad_norm = self.optim.step(lr, loss_finite=finite[0])
        if applied:
            self.lr_step += scheduled
            self.version += 1
            self.skipped_in_a_row = 0
        else:
            self._skipped(finite[0], grad_norm)
        metrics = self._reduce_metrics(reports)
        metrics.update(grad_norm=grad_norm, lr=lr, skipped_updates=0.0 if applied else 1.0)
        return StepResult(metrics=metrics, num_microbatches=len(mbs))

    def _skipped(self, loss_finite: bool, grad_norm: float) -> None:
        """Count an update the non-finite guard refused (every rank does, in step); stop when told to."""
        self.skipped_in_a_row += 1
        cfg = self.optim.cfg
        why = f"gradient norm {grad_norm}" + ("" if loss_finite else ", non-finite loss on this rank")
        patience = cfg.nonfinite_patience if cfg.nonfinite == "stop" else None
        log.warning("update skipped: NaN/inf in the loss or gradients of some rank (%s); the weights are unchanged "
                    "(%d in a row%s)", why, self.skipped_in_a_row,
                    f"; the run stops at {patience}: optim.nonfinite_patience" if patience else "")
        if patience is not None and self.skipped_in_a_row >= patience:
            raise NonFiniteError(
                f"{self.skipped_in_a_row} updates in a row had a NaN/inf loss or gradient ({why}); none was applied, "
                "so the weights and the newest checkpoint hold the last good state. Resume from it with a lower "
                "optim.lr or tighter optim.grad_clip, or set optim.nonfinite=skip to skip such updates and go on")

    def copy_weights_from(self, other: "Learner") -> None:
        """Take another learner's current weights (same layout): the reference model after a warm-up."""
        with torch.no_grad():
            for mine, theirs in zip(self.model.parameters(), other.model.parameters()):
                mine.copy_(theirs.detach().to(mine.device))

    def reset_optimizer_state(self) -> None:
        """Forget Adam's moments (after a supervised warm-up, so RL starts from clean statistics)."""
        self.optim.reset_state()

    # ------------------------------------------------------------------ state for checkpoints
    def sharded_state_dict(self, prefix: str = "", optimizer: bool = True, is_loading: bool = False) -> dict:
        """This rank's part of the learner's state for megatron-core's dist_checkpointing (megaapo.dist_checkpoint):
        the model's sharded tensors under `prefix`, and (when training) the optimizer's, the learning-rate schedule's
        position, the weight version and the count of skipped non-finite updates."""
        from megaapo.dist_checkpoint import model_sharded_state_dict

        model = model_sharded_state_dict(self.model, self.groups, prefix)
        state = {"model": model}
        if optimizer and self.optim is not None:
            state |= {"optimizer": self.optim.sharded_state_dict(model, is_loading), "lr_step": self.lr_step,
                      "version": self.version, "skipped_in_a_row": self.skipped_in_a_row}
        return state

    def load_sharded_state_dict(self, state: dict, prefix: str = "") -> None:
        """Apply what dist_checkpointing read for `sharded_state_dict(prefix, ..., is_loading=True)`: the weights,
        then (when this learner trains) the optimizer state, schedule position and weight version. (The checkpoint's
        non-tensor items come back whether asked for or not.)"""
        tensors = {k[len(prefix):]: v for k, v in state["model"].items()}
        self.load_model_tensors(tensors)
        if self.optim is not None:
            self.optim.load_sharded_state_dict(state["optimizer"])
            self.lr_step, self.version = int(state["lr_step"]), int(state["version"])
            self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))

    def load_model_tensors(self, tensors: dict) -> None:
        """Copy full local shards (state-dict keys) into the model; checked whole before anything is copied."""
        state = {k: v for k, v in self.model.state_dict().items() if not k.endswith("_extra_state")}
        missing = sorted(set(state) - set(tensors))
        if missing:
            raise ValueError(f"checkpoint lacks model tensors {missing[:3]}: written by a different model or layout?")
        wrong = [k for k, v in state.items() if tuple(tensors[k].shape) != tuple(v.shape)]
        if wrong:
            raise ValueError(f"checkpoint tensor {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, this model "
                             f"expects {tuple(state[wrong[0]].shape)}")
        with torch.no_grad():
            for k, v in state.items():
                v.copy_(tensors[k])
        if self.optim is not None:
            self.optim.reload_from_model()

    # ------------------------------------------------------------------ weights out
    def weight_keys(self) -> list[str]:
        """This pipeline stage's parameters that leave it (HF export, the weight transfer to rollout engines), in
        HF layer order: the vision tower first (HF's own module order), then the language model's."""
        tied_copy = self.shape.tie_embeddings and self.groups.pp_size > 1   # the first stage sends the embedding
        keys = [k for k in self.model.state_dict() if not k.endswith("_extra_state")
                and not (tied_copy and k == "lm.output_layer.weight")]
        return sorted(keys, key=lambda k: not k.startswith("vision."))   # stable: each part keeps its order

    def full_weight(self, key: str) -> torch.Tensor:
        """Parameter `key` gathered over TP (a collective: every TP rank of this stage calls it, in the same order)."""
        g = self.groups
        try:
            t = self.model.get_parameter(key).detach()
        except AttributeError:   # a persistent buffer
            t = self.model.get_buffer(key).detach()
        if g.tp_size > 1 and tp_split_of(key) is not None:
            parts = [torch.empty_like(t) for _ in range(g.tp_size)]
            dist.all_gather(parts, t.contiguous(), group=g.tp)
            t = gather_tp(key, parts)
        return t

    def to_hf(self, key: str, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The HF (name, tensor) pairs of one gathered parameter (views of it)."""
        return to_hf(key, full, self.shape, self.model.layer_offset)

    def hf_layout(self) -> list[tuple[str, list[tuple[str, torch.dtype, tuple]]]]:
        """For each of `weight_keys()`, the HF tensors it becomes: (name, dtype, full shape), without gathering."""
        state, tp = self.model.state_dict(), self.groups.tp_size
        out = []
        for key in self.weight_keys():
            t = state[key]
            full = torch.empty(full_shape(key, tuple(t.shape), tp), dtype=t.dtype, device="meta")
            out.append((key, [(n, h.dtype, tuple(h.shape)) for n, h in self.to_hf(key, full)]))
        return out

    def hf_weights(self, dtype: torch.dtype | None = None):
        """Yield this pipeline stage's parameters as full HF (name, tensor) pairs, gathered over TP.

        Every TP rank must iterate (the gathers are collective); tensors are yielded on TP rank 0 only.
        Used by HF export and `megaapo check parity`; rollout engines get the weights through
        `megaapo.rollout.source.LearnerSource`, which routes the stages' tensors to one sender."""
        for key in self.weight_keys():
            t = self.full_weight(key)
            if self.groups.tp_rank == 0:
                for name, full in self.to_hf(key, t):
                    yield name, (full.to(dtype) if dtype is not None else full)

    def export_hf(self, out_dir, dtype: torch.dtype | None = None) -> Path:
        """Write the current policy as an HF directory that transformers and vLLM load (collective on all ranks):
        one safetensors file per pipeline stage plus the index, config and tokenizer files. Written into a tmp dir
        that replaces `out_dir` only when complete; a failed write (disk full) removes it, leaves an earlier export
        untouched and raises on every rank (a WriteError where it failed)."""
        import json

        from safetensors.torch import save_file

        from megaapo.checkpoint import replace_dir
        from megaapo.convert import _SIDE_FILES
        from megaapo.rundir import WriteError, make_dir, writing

        g, out = self.groups, Path(out_dir)
        what = f"exporting the policy to {out} failed (an earlier export there is untouched)"
        tmp = out.with_name(f"{out.name}.tmp-export")   # one writer per run directory: a fixed name is safe
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            make_dir(tmp, what)
        dist.barrier()
        fname = f"model-{g.pp_rank + 1:05d}-of-{g.pp_size:05d}.safetensors"
        tensors = {k: v.contiguous().cpu() for k, v in self.hf_weights(dtype)}
        error = None
        if g.tp_rank == 0 and g.dp_rank == 0:
            try:
                with writing(tmp / fname, what, probe=True):
                    save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            except WriteError as e:
                error = e
        names = [None] * dist.get_world_size()
        dist.all_gather_object(names, ((fname, sorted(tensors)) if g.tp_rank == 0 and g.dp_rank == 0 else None,
                                       None if error is None else str(error)))
        failed = next((e for _, e in names if e is not None), None)
        if dist.get_rank() == 0 and failed is None:
            weight_map = {n: f for item, _ in names if item for f, ns in [item] for n in ns}
            try:
                with writing(tmp, what):
                    (tmp / "model.safetensors.index.json").write_text(
                        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
                    for name in _SIDE_FILES:
                        if (self.hf_dir / name).is_file():
                            shutil.copy2(self.hf_dir / name, tmp / name)
                    replace_dir(tmp, out)
            except WriteError as e:
                error = failed = e
        if failed is not None and dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        if error is not None:
            raise error
        if failed is not None:
            raise RuntimeError(failed)
        return out
