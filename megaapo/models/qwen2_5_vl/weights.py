"""Hugging Face <-> megatron-core weight maps for Qwen2.5-VL, per tensor-parallel shard.

Used by the learner (load a TP x PP rank's shard straight from HF safetensors), the converter
(`megaapo convert`), HF export and the weight broadcast to rollout engines (gathered shards back to HF names).

Layouts that differ from HF:
- `linear_qkv` fuses q, k, v per query group: for each KV group g, its nq/ng query heads, then its k head, then its
  v head. TP ranks own contiguous groups, so a rank reads three contiguous row ranges and the full tensor is the
  rank shards concatenated in order.
- `linear_fc1` is [gate; up] *per rank*: the full tensor is not the concatenation of shards, it is rebuilt half by
  half.
- row-parallel layers (`linear_proj`, `linear_fc2`) split columns; embeddings and lm_head split vocabulary rows.
- the vision tower keeps transformers' names and is replicated.
A rank reads only the slices it owns (safetensors `get_slice`), never the full model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import CheckpointError, LMShape

_LAYER = re.compile(r"^lm\.decoder\.layers\.(\d+)\.(.+)$")
# mcore suffix inside a layer -> (HF suffix inside `model.layers.N.`, how TP splits it)
_LAYER_MAP = {
    "input_layernorm.weight": ("input_layernorm.weight", None),
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight", None),   # Transformer Engine spec
    "self_attention.linear_qkv.weight": ("self_attn.{q,k,v}_proj.weight", "qkv"),
    "self_attention.linear_qkv.bias": ("self_attn.{q,k,v}_proj.bias", "qkv"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", "cols"),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight", None),
    "mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm.weight", None),   # Transformer Engine spec
    "mlp.linear_fc1.weight": ("mlp.{gate,up}_proj.weight", "fc1"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight", "cols"),
}
_TOP_MAP = {
    "lm.embedding.word_embeddings.weight": ("model.embed_tokens.weight", "rows"),
    "lm.decoder.final_layernorm.weight": ("model.norm.weight", None),
}


class HFReader:
    """Lazy access to the tensors of an HF checkpoint directory (single or sharded safetensors)."""

    # transformers 5.x may write the nested layout; original Qwen2.5-VL checkpoints use the flat one.
    _ALIASES = (("model.", "model.language_model."), ("visual.", "model.visual."), ("lm_head.", "lm_head."))

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            files = None
        else:
            raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        self._handles: dict[str, object] = {}
        self._where: dict[str, str] = {}
        names = sorted(set(files.values())) if files else ["model.safetensors"]
        for fname in names:
            h = safe_open(self.path / fname, "pt")
            self._handles[fname] = h
            for k in h.keys():
                self._where[self._canonical(k)] = (fname, k)

    def _canonical(self, name: str) -> str:
        for flat, nested in self._ALIASES:
            if nested != flat and name.startswith(nested):
                return flat + name[len(nested):]
        return name

    def keys(self) -> list[str]:
        return sorted(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def slice(self, name: str):
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        fname, key = self._where[name]
        return self._handles[fname].get_slice(key)

    def get(self, name: str) -> torch.Tensor:
        fname, key = self._where.get(name, (None, None))
        if fname is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        return self._handles[fname].get_tensor(key)


def hf_target(key: str, layer_offset: int, shape: LMShape) -> tuple[list[str], str | None]:
    """The HF tensor name(s) an mcore state-dict key is built from, and how TP splits it."""
    if key.startswith("vision."):
        return ["visual." + key[len("vision."):]], None
    if key in _TOP_MAP:
        name, split = _TOP_MAP[key]
        return [name], split
    if key == "lm.output_layer.weight":
        return (["model.embed_tokens.weight"] if shape.tie_embeddings else ["lm_head.weight"]), "rows"
    m = _LAYER.match(key)
    if m and m.group(2) in _LAYER_MAP:
        prefix = f"model.layers.{int(m.group(1)) + layer_offset}."
        name, split = _LAYER_MAP[m.group(2)]
        if "{" in name:
            head, parts, tail = re.match(r"(.*)\{(.*)\}(.*)", name).groups()
            return [prefix + head + p + tail for p in parts.split(",")], split
        return [prefix + name], split
    raise CheckpointError(f"no Hugging Face counterpart for megatron-core parameter {key!r}")


def read_shard(reader: HFReader, key: str, shape: LMShape, tp: int, tp_rank: int, layer_offset: int) -> torch.Tensor:
    """The slice of HF weights that megatron parameter `key` holds on TP rank `tp_rank`."""
    names, split = hf_target(key, layer_offset, shape)
    if split is None:
        return reader.get(names[0])
    if split == "rows":
        s = reader.slice(names[0])
        n = s.get_shape()[0]
        if n % tp:
            raise CheckpointError(f"{names[0]}: {n} rows do not divide by parallel.tp={tp}")
        return s[tp_rank * n // tp:(tp_rank + 1) * n // tp]
    if split == "cols":
        s = reader.slice(names[0])
        n = s.get_shape()[1]
        if n % tp:
            raise CheckpointError(f"{names[0]}: {n} columns do not divide by parallel.tp={tp}")
        return s[:, tp_rank * n // tp:(tp_rank + 1) * n // tp]
    if split == "fc1":
        parts = []
        for name in names:
            s = reader.slice(name)
            n = s.get_shape()[0]
            if n % tp:
                raise CheckpointError(f"{name}: {n} rows do not divide by parallel.tp={tp}")
            parts.append(s[tp_rank * n // tp:(tp_rank + 1) * n // tp])
        return torch.cat(parts, 0)
    # qkv: this rank's query groups, each as [its q heads, k, v]
    groups = shape.num_kv_heads // tp
    g0, d, per_q = tp_rank * groups, shape.head_dim, shape.num_heads // shape.num_kv_heads
    q, k, v = (reader.slice(n) for n in names)
    for n, s, rows in zip(names, (q, k, v), (shape.num_heads * d, shape.num_kv_heads * d, shape.num_kv_heads * d)):
        if s.get_shape()[0] != rows:
            raise CheckpointError(f"{n}: shape {s.get_shape()} does not match {rows} rows from config.json")
    qs = q[g0 * per_q * d:(g0 + groups) * per_q * d]
    ks, vs = k[g0 * d:(g0 + groups) * d], v[g0 * d:(g0 + groups) * d]
    tail = qs.shape[1:]
    fused = torch.cat([qs.reshape(groups, per_q * d, *tail), ks.reshape(groups, d, *tail),
                       vs.reshape(groups, d, *tail)], 1)
    return fused.reshape(-1, *tail)


def tp_split_of(key: str) -> str | None:
    """How a parameter is split across TP ranks (None: replicated)."""
    if key.startswith("vision."):
        return None
    if key in _TOP_MAP:
        return _TOP_MAP[key][1]
    if key == "lm.output_layer.weight":
        return "rows"
    m = _LAYER.match(key)
    return _LAYER_MAP[m.group(2)][1] if m and m.group(2) in _LAYER_MAP else None


def gather_tp(key: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Full mcore tensor from its TP shards in rank order (the inverse of the rank slicing above)."""
    split = tp_split_of(key)
    if split is None or len(shards) == 1:
        return shards[0]
    if split == "cols":
        return torch.cat(shards, 1)
    if split == "fc1":
        halves = [s.chunk(2, 0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
    return torch.cat(shards, 0)   # rows and qkv: rank shards are contiguous ranges of the full layout


def full_shape(key: str, shard_shape: tuple, tp: int) -> tuple:
    """The full (TP-gathered) shape of an mcore tensor from one rank's shard shape."""
    split, shape = tp_split_of(key), list(shard_shape)
    if split is not None and tp > 1:
        shape[1 if split == "cols" else 0] *= tp
    return tuple(shape)


def to_hf(key: str, full: torch.Tensor, shape: LMShape, layer_offset: int) -> list[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs of one full (TP-gathered) mcore tensor."""
    names, split = hf_target(key, layer_offset, shape)
    if split == "fc1":
        gate, up = full.chunk(2, 0)
        return [(names[0], gate), (names[1], up)]
    if split == "qkv":
        d, per_q = shape.head_dim, shape.num_heads // shape.num_kv_heads
        tail = full.shape[1:]
        grouped = full.reshape(shape.num_kv_heads, (per_q + 2) * d, *tail)
        q, k, v = grouped.split([per_q * d, d, d], 1)
        return [(n, t.reshape(-1, *tail)) for n, t in zip(names, (q, k, v))]
    return [(names[0], full)]


def load_into(model, reader: HFReader, shape: LMShape, tp: int, tp_rank: int) -> None:
    """Copy this rank's shard of every parameter from the HF checkpoint; any missing or misshapen tensor aborts
    before the model is used (the caller discards the model on error, so nothing half-loaded trains)."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    loaded = {}
    for key, param in state.items():
        t = read_shard(reader, key, shape, tp, tp_rank, model.layer_offset)
        if tuple(t.shape) != tuple(param.shape):
            names, _ = hf_target(key, model.layer_offset, shape)
            raise CheckpointError(f"{', '.join(names)}: checkpoint shard has shape {tuple(t.shape)}, the model "
                                  f"expects {tuple(param.shape)} for {key} at tp={tp}")
        loaded[key] = t
    with torch.no_grad():
        for key, param in state.items():
            param.copy_(loaded[key].to(param.dtype))
