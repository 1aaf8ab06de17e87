"""`megaapo convert`: HF Qwen2.5-VL directories <-> megatron-core sharded checkpoints (any TP x PP), bit-exact.

An mcore checkpoint directory holds one safetensors file per (TP, PP) rank with exactly the state-dict keys the
learner's model has on that rank, plus `mcore.json` (layout) and the HF side files (config, tokenizer, processor) in
`hf/`, so converting back yields a directory that transformers and vLLM load. Conversion is a single process that
never holds more than one tensor's shards at a time: each rank's file is written from slices of the HF files.
The learner loads either format (`load_weights`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from megaapo.models.qwen2_5_vl.config import CheckpointError, check_layout, load_hf_config, lm_shape
from megaapo.models.qwen2_5_vl.weights import HFReader, gather_tp, read_shard, to_hf

MCORE_META = "mcore.json"
_LAYER_KEYS = ("input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
               "self_attention.linear_proj.weight", "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight",
               "mlp.linear_fc2.weight")
_SIDE_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
               "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")


def rank_keys(shape, vision_keys: list[str], pp: int, pp_rank: int) -> list[str]:
    """The learner model's state-dict keys on pipeline stage pp_rank (the same on every TP rank)."""
    per_stage = shape.num_layers // pp
    keys = [f"lm.decoder.layers.{i}.{k}" for i in range(per_stage) for k in _LAYER_KEYS]
    if pp_rank == 0:
        keys = ["lm.embedding.word_embeddings.weight"] + ["vision." + k[len("visual."):] for k in vision_keys] + keys
    if pp_rank == pp - 1:
        keys.append("lm.decoder.final_layernorm.weight")
        if not shape.tie_embeddings or pp > 1:
            keys.append("lm.output_layer.weight")
    return keys


def rank_file(root: Path, tp_rank: int, pp_rank: int) -> Path:
    return Path(root) / f"tp{tp_rank:02d}_pp{pp_rank:03d}" / "model.safetensors"


def hf_to_mcore(src, dst, tp: int = 1, pp: int = 1, progress: bool = True) -> Path:
    src, dst = Path(src), Path(dst)
    cfg = load_hf_config(src)
    shape = lm_shape(cfg)
    check_layout(shape, tp, pp)
    reader = HFReader(src)
    vision = [k for k in reader.keys() if k.startswith("visual.")]
    if not vision:
        raise CheckpointError(f"{src}: no vision tower tensors (visual.*) in the checkpoint")
    jobs = [(t, p) for p in range(pp) for t in range(tp)]
    bar = _bar(len(jobs), "hf -> mcore", progress)
    for t, p in jobs:
        offset = p * (shape.num_layers // pp)
        tensors = {k: read_shard(reader, k, shape, tp, t, offset).contiguous()
                   for k in rank_keys(shape, vision, pp, p)}
        out = rank_file(dst, t, p)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out))
        bar.update(1)
    bar.close()
    (dst / "hf").mkdir(parents=True, exist_ok=True)
    for name in _SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / "hf" / name)
    (dst / MCORE_META).write_text(json.dumps({"format": "megaapo-mcore-1", "tp": tp, "pp": pp,
                                              "vision_keys": vision}, indent=2))
    return dst


def read_meta(root) -> dict:
    path = Path(root) / MCORE_META
    if not path.is_file():
        raise CheckpointError(f"{root}: no {MCORE_META}; not a megaapo mcore checkpoint (convert one with "
                              "`megaapo convert hf-to-mcore SRC DST --tp T --pp P`)")
    return json.loads(path.read_text())


def mcore_to_hf(src, dst, progress: bool = True, dtype: torch.dtype | None = None) -> Path:
    """Gather every rank's shards back into one HF directory (model.safetensors + side files)."""
    from safetensors import safe_open

    src, dst = Path(src), Path(dst)
    meta = read_meta(src)
    tp, pp = meta["tp"], meta["pp"]
    cfg = load_hf_config(src / "hf")
    shape = lm_shape(cfg)
    files = {(t, p): rank_file(src, t, p) for t in range(tp) for p in range(pp)}
    for f in files.values():
        if not f.is_file():
            raise CheckpointError(f"{src}: shard {f.relative_to(src)} is missing")
    handles = {tp_pp: safe_open(str(f), "pt") for tp_pp, f in files.items()}
    out: dict[str, torch.Tensor] = {}
    bar = _bar(pp, "mcore -> hf", progress)
    for p in range(pp):
        offset = p * (shape.num_layers // pp)
        for key in rank_keys(shape, meta["vision_keys"], pp, p):
            if shape.tie_embeddings and key == "lm.output_layer.weight":
                continue   # the last stage's copy of the tied embedding
            full = gather_tp(key, [handles[(t, p)].get_tensor(key) for t in range(tp)])
            for name, tensor in to_hf(key, full, shape, offset):
                out[name] = tensor.to(dtype) if dtype is not None else tensor
        bar.update(1)
    bar.close()
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for name in _SIDE_FILES:
        if (src / "hf" / name).is_file():
            shutil.copy2(src / "hf" / name, dst / name)
    return dst


def load_mcore_into(model, root, tp: int, tp_rank: int, pp: int, pp_rank: int) -> None:
    """Load a learner rank from an mcore checkpoint written with the same layout."""
    from safetensors.torch import load_file

    meta = read_meta(root)
    if (meta["tp"], meta["pp"]) != (tp, pp):
        raise CheckpointError(f"{root} was written for tp={meta['tp']}, pp={meta['pp']}; this run uses tp={tp}, "
                              f"pp={pp}. Convert it to HF (`megaapo convert mcore-to-hf`) and load that instead.")
    tensors = load_file(str(rank_file(root, tp_rank, pp_rank)))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing = sorted(set(state) - set(tensors))
    if missing:
        raise CheckpointError(f"{root}: rank tp={tp_rank} pp={pp_rank} lacks {missing[:3]}")
    for k, v in state.items():
        if tensors[k].shape != v.shape:
            raise CheckpointError(f"{root}: {k} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}")
    with torch.no_grad():
        for k, v in state.items():
            v.copy_(tensors[k])


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="rank", disable=not enabled)
