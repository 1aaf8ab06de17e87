"""Samples the learner scores or trains on, and their grouping into token-budget micro-batches.

A `Sample` is one prompt + response as token ids, with its images already turned into patches (the processor runs
once, at rollout time). `pack` forms micro-batches of at most `token_budget` tokens in one of two ways:
- packed (`packing=True`, the default): several samples share one row (first-fit decreasing); the row carries its
  samples' boundaries (`cu_seqlens`), so attention runs per sample through a variable-length kernel
  (megaapo.models.qwen2_5_vl.attention) and no token attends across samples; mrope positions are each sample's own
  (restarting at 0). No padding and nothing of size row_length^2.
- padded (`packing=False`): samples of similar length are stacked as rows [b, S], right-padded. Plain causal
  attention is then exact (a real token never attends to the padding after it); the budget counts the padding
  (b * S), and so does every layer's compute.
A sample longer than the budget gets a micro-batch of its own. Called by `megaapo.learner`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sample:
    input_ids: torch.Tensor                      # [L] prompt + response token ids
    prompt_len: int                              # tokens before the first response token
    position_ids: torch.Tensor                   # [3, L] mrope positions (megaapo.models.qwen2_5_vl.rope)
    pixel_values: torch.Tensor | None = None     # [patches, C * T * P * P] of this sample's images, in order
    image_grid_thw: torch.Tensor | None = None   # [n_images, 3]
    image_token_id: int = -1                     # which prompt tokens take image features

    @property
    def response_len(self) -> int:
        return int(self.input_ids.shape[0]) - self.prompt_len


@dataclass
class MicroBatch:
    rows: list[int]                              # indices of the samples in the caller's batch
    input_ids: torch.Tensor                      # [b, T]
    position_ids: torch.Tensor                   # [3, b, T]
    labels: torch.Tensor                         # [b, T] next token at each position (0 where none)
    response_spans: list[tuple[int, int]]        # per sample: flat positions [a, b) (row * T + t) whose next token
                                                 # is a response token
    cu_seqlens: torch.Tensor | None = None       # packed row: [n + 1] int32 sample boundaries; None = causal rows
    max_seqlen: int = 0                          # longest sample of a packed row
    image_mask: torch.Tensor | None = None       # [b, T] positions that take image features (prompt image pads)
    pixel_values: torch.Tensor | None = None     # each distinct image once (samples of a group share theirs)
    image_grid_thw: torch.Tensor | None = None
    feature_index: torch.Tensor | None = None    # [image tokens] row of the vision output each image pad takes
    num_tokens: int = 0
    extras: dict = field(default_factory=dict)


def plan(lengths: list[int], token_budget: int, packing: bool = True) -> list[list[int]]:
    """Group sample indices into micro-batches of at most token_budget tokens (deterministic).

    packing: first-fit decreasing into rows; padded: longest first, b rows of the group's longest length."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if not packing:
        groups: list[list[int]] = []
        for i in order:
            if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= token_budget:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(token_budget - lengths[i])
    return [sorted(b) for b in bins]


def _images(parts: list[Sample]):
    """Distinct image blocks (by identity: the G samples of a prompt share one pixel tensor, so the vision tower
    runs once per prompt, not once per sample) and, per image token in batch order, its vision-output row."""
    unique: dict[int, int] = {}
    pix, grids, spans = [], [], []
    start = 0
    for s in parts:
        if s.pixel_values is None:
            continue
        key = id(s.pixel_values)
        if key not in unique:
            n = int((s.image_grid_thw.prod(-1) // 4).sum())
            unique[key] = len(pix)
            pix.append(s.pixel_values)
            grids.append(s.image_grid_thw)
            spans.append((start, start + n))
            start += n
    if not pix:
        return None, None, None
    index = torch.cat([torch.arange(*spans[unique[id(s.pixel_values)]]) for s in parts
                       if s.pixel_values is not None])
    return torch.cat(pix), torch.cat(grids), index


def collate_padded(samples: list[Sample], rows: list[int]) -> MicroBatch:
    """The given samples as right-padded rows [b, T] (causal attention needs no mask)."""
    parts = [samples[r] for r in rows]
    width = max(int(s.input_ids.shape[0]) for s in parts)
    ids = torch.zeros(len(parts), width, dtype=torch.long)
    pos = torch.zeros(3, len(parts), width, dtype=torch.long)
    labels = torch.zeros_like(ids)
    in_prompt = torch.zeros(len(parts), width, dtype=torch.bool)
    spans = []
    for i, s in enumerate(parts):
        n = s.input_ids.shape[0]
        ids[i, :n], pos[:, i, :n], labels[i, :n - 1] = s.input_ids, s.position_ids, s.input_ids[1:]
        in_prompt[i, :s.prompt_len] = True
        spans.append((i * width + s.prompt_len - 1, i * width + n - 1))
    pix, grids, index = _images(parts)
    image_mask = in_prompt & (ids == parts[0].image_token_id) if pix is not None else None
    return MicroBatch(rows=list(rows), input_ids=ids, position_ids=pos, labels=labels, response_spans=spans,
                      image_mask=image_mask, pixel_values=pix, image_grid_thw=grids, feature_index=index,
                      num_tokens=len(parts) * width)


def collate(samples: list[Sample], rows: list[int]) -> MicroBatch:
    """One packed row of the given samples."""
    parts = [samples[r] for r in rows]
    ids = torch.cat([s.input_ids for s in parts])
    pos = torch.cat([s.position_ids for s in parts], 1)
    labels = torch.zeros_like(ids)
    in_prompt = torch.zeros(ids.shape[0], dtype=torch.bool)
    spans, bounds, start = [], [0], 0
    for s in parts:
        n = s.input_ids.shape[0]
        labels[start:start + n - 1] = s.input_ids[1:]
        spans.append((start + s.prompt_len - 1, start + n - 1))
        in_prompt[start:start + s.prompt_len] = True
        start += n
        bounds.append(start)
    # A row of one sample is plain causal attention (SDPA's own causal kernel); boundaries only for several.
    cu = torch.tensor(bounds, dtype=torch.int32) if len(parts) > 1 else None
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    pix, grids, index = _images(parts)
    # Image features go to the prompts' image pads only; an image-pad id sampled in a response is a token.
    image_mask = (in_prompt & (ids == parts[0].image_token_id))[None] if pix is not None else None
    return MicroBatch(rows=list(rows), input_ids=ids[None], position_ids=pos[:, None], labels=labels[None],
                      response_spans=spans, cu_seqlens=cu, max_seqlen=longest, image_mask=image_mask,
                      pixel_values=pix, feature_index=index,
                      image_grid_thw=grids, num_tokens=start)


def pack(samples: list[Sample], token_budget: int, packing: bool = True) -> list[MicroBatch]:
    lengths = [int(s.input_ids.shape[0]) for s in samples]
    make = collate if packing else collate_padded
    return [make(samples, rows) for rows in plan(lengths, token_budget, packing)]
