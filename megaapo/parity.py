"""`megaapo check parity`: does the megatron-core learner compute what transformers computes, at a given TP x PP?

Both implementations get the same HF weights and the same batch (two samples, images of different sizes, a response
after each prompt). Compared: logits at every position, per-token response log-probs, and the gradient of every
parameter (in HF names) after one backward pass of a response-token loss. The error of a tensor is
max|got - ref| / max|ref| (relative to the tensor's scale, so near-zero entries do not dominate).

The learner side runs in tp x pp worker processes (gloo on CPU, NCCL on GPU) started here; each writes its piece to
a scratch directory and the parent merges them. Used by the CLI and tests/test_learner.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

RESPONSES = ["<think>3 squares</think><answer>3</answer>", "<answer>7</answer>"]


def parity_batch(hf_path):
    """Two (prompt + response) samples with a 112x84 and a 56x56 image: (input_ids list, prompt_lens, pixel list,
    grid list, mm_token_type_ids list)."""
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(hf_path)
    images = [Image.new("RGB", (112, 84), (150, 40, 200)), Image.new("RGB", (56, 56), (20, 190, 90))]
    for img, shade in zip(images, (60, 230)):
        img.paste((shade, shade, shade), (8, 8, 30, 30))   # not a flat image: the vision tower sees structure
    out = []
    for image, question, response in zip(images, ["How many squares?", "Which digit?"], RESPONSES):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
        p = proc(text=[prompt], images=[image], return_tensors="pt")
        full = proc(text=[prompt + response], images=[image], return_tensors="pt")
        out.append(dict(input_ids=full.input_ids[0], prompt_len=p.input_ids.shape[1], pixel_values=full.pixel_values,
                        image_grid_thw=full.image_grid_thw, mm_token_type_ids=full.mm_token_type_ids[0]))
    return out


def hf_reference(hf_path, batch) -> dict:
    """transformers' logits, response log-probs and parameter gradients (fp32)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_path, dtype=torch.float32)
    model.train()
    total = sum(len(s["input_ids"]) - s["prompt_len"] for s in batch)
    res = {"logits": [], "logp": []}
    for s in batch:
        out = model(input_ids=s["input_ids"][None], pixel_values=s["pixel_values"],
                    image_grid_thw=s["image_grid_thw"], mm_token_type_ids=s["mm_token_type_ids"][None])
        logits = out.logits[0].float()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, s["input_ids"][1:, None])[:, 0][s["prompt_len"] - 1:]
        (-lp.sum() / total).backward()
        res["logits"].append(logits.detach())
        res["logp"].append(lp.detach())
    sd = dict(model.named_parameters())
    res["grads"] = {_hf_name(k): p.grad.detach().clone() for k, p in sd.items() if p.grad is not None}
    return res


def _hf_name(module_name: str) -> str:
    """transformers 5.x module names -> checkpoint tensor names (what the learner exports)."""
    if module_name.startswith("model.language_model."):
        return "model." + module_name[len("model.language_model."):]
    if module_name.startswith("model.visual."):
        return "visual." + module_name[len("model.visual."):]
    return module_name


def learner_worker(rank: int, world: int, port: int, hf_path: str, tp: int, pp: int, out_dir: str,
                   packed: bool = False) -> None:
    """One learner rank: logits, log-probs and gradients of its shard, written to out_dir/rank{rank}.pt.
    packed: both samples in one packed row (variable-length attention) instead of one micro-batch each."""
    from megaapo.distributed import set_rank_env

    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megaapo.config import ModelConfig, OptimConfig, ParallelConfig
    from megaapo.distributed import destroy, init_distributed
    from megaapo.learner import Learner

    groups = init_distributed(tp=tp, pp=pp)
    learner = Learner(hf_path, groups, ModelConfig(dtype="float32"),
                      ParallelConfig(tp=tp, pp=pp, micro_batch_tokens=1),
                      OptimConfig(impl="torch", grad_clip=0.0))   # torch: the gradients stay in param.grad
    batch = parity_batch(hf_path)
    samples = [learner.make_sample(s["input_ids"], s["prompt_len"], s["pixel_values"], s["image_grid_thw"])
               for s in batch]
    total = sum(s.response_len for s in samples)
    res: dict = {"logits": {}, "logp": {}}

    def loss_of(mb, hidden):
        lp, _, mask = learner._response_logprobs(hidden, mb, 1.0, False)
        logits = hidden[:, 0].detach() @ learner.model.output_weight().detach().t()
        if groups.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(groups.tp_size)]
            dist.all_gather(parts, logits.contiguous(), group=groups.tp)
            logits = torch.cat(parts, -1)
        bounds = mb.cu_seqlens.tolist() if mb.cu_seqlens is not None else [0, logits.shape[0]]
        for i, r in enumerate(mb.rows):
            res["logits"][r] = logits[bounds[i]:bounds[i + 1]]
            res["logp"][r] = lp[i][mask[i]].detach()
        return -(lp * mask).sum() / total, torch.tensor(1), {}

    from megaapo.data.packing import pack
    mbs = pack(samples, 10**9, packing=True) if packed else pack(samples, 1, packing=False)
    assert len(mbs) == (1 if packed else len(samples))
    learner._run(mbs, loss_of, forward_only=False)
    learner.optim.finish_grads()
    grads = {}
    for key, p in learner.model.named_parameters():
        p.data = p.grad if p.grad is not None else torch.zeros_like(p)   # export the gradients through the weight map
    for name, g in learner.hf_weights():
        grads[name] = g.clone()
    if groups.last_stage and groups.tp_rank == 0:
        res["logits"] = [res["logits"][i] for i in range(len(samples))]
        res["logp"] = [res["logp"][i] for i in range(len(samples))]
    else:
        res = {}
    res["grads"] = grads
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    destroy()


def run_learner(hf_path, tp: int, pp: int, packed: bool = False) -> dict:
    """Start tp x pp learner processes and merge what they computed."""
    from megaapo.distributed import spawn

    world = tp * pp
    with tempfile.TemporaryDirectory() as tmp:
        spawn(learner_worker, world, str(hf_path), tp, pp, tmp, packed)
        merged: dict = {"grads": {}}
        for r in range(world):
            part = torch.load(Path(tmp) / f"rank{r}.pt")
            merged["grads"].update(part.pop("grads"))
            merged.update(part)
    return merged


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30))


def compare(got: dict, ref: dict) -> dict:
    """Max relative error per quantity; missing gradients count as infinite error."""
    out = {"logits": max(rel_err(g, r) for g, r in zip(got["logits"], ref["logits"])),
           "logp": max(rel_err(g, r) for g, r in zip(got["logp"], ref["logp"]))}
    worst, worst_name = 0.0, ""
    for name, r in ref["grads"].items():
        e = rel_err(got["grads"][name], r) if name in got["grads"] else float("inf")
        if e > worst:
            worst, worst_name = e, name
    out["grads"] = worst
    out["worst_grad"] = worst_name
    out["n_grads"] = len(ref["grads"])
    return out


def check(hf_path, tp: int = 1, pp: int = 1, packed: bool = False) -> dict:
    """packed: the learner runs the batch as one packed row (each sample attends to itself only; HF runs each
    sample alone either way)."""
    batch = parity_batch(hf_path)
    ref = hf_reference(hf_path, batch)
    got = run_learner(hf_path, tp, pp, packed)
    return compare(got, ref)
