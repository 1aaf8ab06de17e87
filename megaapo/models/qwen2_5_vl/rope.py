"""Multimodal rotary (mrope) position ids of one sequence, as transformers 5.x's `get_rope_index` computes them.

Text tokens advance all three axes (temporal, height, width) together; the tokens of one image form a grid: the
temporal axis holds the start position, height and width count rows and columns of the merged patch grid from the
start position, and the text after the image continues at start + max(h, w). Computed per sequence so that packed
rows (several sequences, positions restarting at 0 in each) and rollouts (prompt + response) share one code path.
Called by `megaapo.data.packing`; checked against transformers in tests/test_learner.py.
"""

from __future__ import annotations

import torch


def mrope_positions(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, *, image_token_id: int,
                    spatial_merge_size: int, video_token_id: int | None = None,
                    prompt_len: int | None = None) -> torch.Tensor:
    """input_ids [L] (one sequence), image_grid_thw [n_images, 3] in order of appearance -> positions [3, L].

    Images live in the prompt: tokens at or after `prompt_len` are text even when a policy samples an image-pad id
    (vLLM decodes them as text too)."""
    ids = input_ids.tolist()
    limit = len(ids) if prompt_len is None else prompt_len
    if video_token_id is not None and video_token_id in ids[:limit]:
        raise ValueError("video inputs are not supported by megaapo's learner yet")
    grids = [] if image_grid_thw is None else [tuple(int(x) for x in g) for g in image_grid_thw]
    out = torch.empty(3, len(ids), dtype=torch.long)
    # Walk runs, not tokens: a text run is one arange, an image block one meshgrid (this runs for every sample).
    starts = [i for i in range(limit) if ids[i] == image_token_id and (i == 0 or ids[i - 1] != image_token_id)]
    pos, i, g = 0, 0, 0
    for start in starts + [len(ids)]:
        while i < start:   # text up to the next image run (or the end)
            out[:, i:start] = torch.arange(pos, pos + start - i)
            pos, i = pos + start - i, start
        if start == len(ids):
            break
        run_end = start
        while run_end < limit and ids[run_end] == image_token_id:
            run_end += 1
        while i < run_end:   # consecutive images with no text between them form one run
            if g >= len(grids):
                raise ValueError(f"sequence has more image blocks than image_grid_thw rows ({len(grids)})")
            t, h, w = grids[g][0], grids[g][1] // spatial_merge_size, grids[g][2] // spatial_merge_size
            n = t * h * w
            if i + n > run_end:
                raise ValueError(f"image {g}: expected {n} consecutive image tokens for grid {grids[g]} at "
                                 f"position {i}")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            out[0, i:i + n] = tt.flatten() + pos
            out[1, i:i + n] = hh.flatten() + pos
            out[2, i:i + n] = ww.flatten() + pos
            pos += max(h, w)
            i, g = i + n, g + 1
    if g != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} rows but the sequence holds {g} image blocks")
    return out
