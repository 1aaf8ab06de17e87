"""`megaapo convert`: HF Qwen2.5-VL directories <-> megatron-core sharded checkpoints (any TP x PP), bit-exact;
training checkpoints resharded or exported.

An mcore checkpoint directory holds one safetensors file per (TP, PP) rank with exactly the state-dict keys the
learner's model has on that rank, plus `mcore.json` (layout) and the HF side files (config, tokenizer, processor) in
`hf/`, so converting back yields a directory that transformers and vLLM load. hf-to-mcore is a single process that
never holds more than one tensor's shards at a time: each rank's file is written from slices of the HF files.
The learner loads either format (`load_weights`).

Training checkpoints (`step_N`, megaapo.dist_checkpoint) are read by the learner itself: `mcore-to-hf` loads one in
this process (TP = PP = 1) and exports the policy; `reshard` loads one at the target layout in TP x PP x DP CPU
processes and writes it again there (a checkpoint of megaapo's older per-rank format 1 is loaded at the layout that
wrote it and written in the current, layout-free format).
"""

from __future__ import annotations

import json
import re
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
    src = Path(src)
    return _write_mcore(HFReader(src), src, Path(dst), tp, pp, progress)


def _write_mcore(reader, side_dir: Path, dst: Path, tp: int, pp: int, progress: bool) -> Path:
    """One safetensors file per (TP, PP) rank from `reader` (HF names; HFReader or _TensorReader)."""
    cfg = load_hf_config(side_dir)
    shape = lm_shape(cfg)
    check_layout(shape, tp, pp)
    vision = [k for k in reader.keys() if k.startswith("visual.")]
    if not vision:
        raise CheckpointError(f"{reader.path}: no vision tower tensors (visual.*) in the checkpoint")
    jobs = [(t, p) for p in range(pp) for t in range(tp)]
    bar = _bar(len(jobs), "-> mcore", progress)
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
        if (side_dir / name).is_file():
            shutil.copy2(side_dir / name, dst / "hf" / name)
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
    """Gather every rank's shards back into one HF directory (model.safetensors + side files). `src` is an
    hf-to-mcore directory or a training checkpoint (`step_N`; its policy)."""
    src, dst = Path(src), Path(dst)
    if not (src / MCORE_META).is_file() and _is_training_checkpoint(src):
        return _spawn_one(_export_worker, src, dst)
    out = _gather_hf(src, progress, dtype)
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for name in _SIDE_FILES:
        if (src / "hf" / name).is_file():
            shutil.copy2(src / "hf" / name, dst / name)
    return dst


def _gather_hf(src: Path, progress: bool, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

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
    return out


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


# ------------------------------------------------------------------------------------------------- reshard
def reshard(src, dst, tp: int = 1, pp: int = 1, dp: int = 1, progress: bool = True) -> Path:
    """`src` at tp x pp (x dp) written to `dst`. An hf-to-mcore directory is re-split in this process; a training
    checkpoint is loaded at that layout by tp*pp*dp CPU processes and written again as `dst/step_N`
    (`checkpoint.resume=dst` resumes it)."""
    src, dst = Path(src), Path(dst)
    if (src / MCORE_META).is_file():
        if dp != 1:
            raise CheckpointError("--dp applies to training checkpoints; hf-to-mcore directories hold weights only")
        return _write_mcore(_TensorReader(src, _gather_hf(src, progress)), src / "hf", dst, tp, pp, progress)
    step_dir = _training_step_dir(src)
    from megaapo import dist_checkpoint as dckpt

    if dckpt.format_of(step_dir) >= 2:
        check_layout(lm_shape(load_hf_config(step_dir / dckpt.HF)), tp, pp)
        _spawn(_reshard_worker, tp * pp * dp, step_dir, dst, tp, pp)
    else:   # format 1 loads only at the layout that wrote it (its run's config.yaml says which)
        run = _format1_run_config(step_dir)
        check_layout(lm_shape(load_hf_config(_format1_model(step_dir, run))), tp, pp)
        world = json.loads((step_dir / "COMPLETE").read_text())["world_size"]
        _spawn(_reshard_worker, world, step_dir, dst, run.parallel.tp, run.parallel.pp)
    return dst / step_dir.name


def _is_training_checkpoint(p: Path) -> bool:
    from megaapo import checkpoint as ckpt

    return (p / ckpt.MARKER).is_file() or any(p.glob(f"step_*/{ckpt.MARKER}"))


def _training_step_dir(src: Path) -> Path:
    from megaapo import checkpoint as ckpt

    if (src / ckpt.MARKER).is_file():
        return src
    latest = ckpt.find_latest(src)
    if latest is None:
        raise CheckpointError(f"{src}: neither an hf-to-mcore directory ({MCORE_META}) nor a complete training "
                              "checkpoint (step_N with a COMPLETE manifest) or a directory of them")
    return latest


def _format1_run_config(step_dir: Path):
    from megaapo.config import load_config

    cfg = step_dir.parent.parent / "config.yaml"
    if not cfg.is_file():
        raise CheckpointError(f"{step_dir} is in megaapo's format 1 and {cfg} (the layout and model that wrote it) is "
                              "missing; keep the checkpoint inside its run directory to convert it")
    return load_config(str(cfg))


def _format1_model(step_dir: Path, run) -> Path:
    from megaapo.assets import ensure_model

    return ensure_model(run.model, step_dir.parent.parent)


def _spawn(worker, world: int, *args) -> None:
    """Run worker on `world` CPU processes; a failure comes back as one CheckpointError with the worker's message."""
    from torch.multiprocessing import ProcessRaisedException

    from megaapo.distributed import spawn

    try:
        spawn(worker, world, *(str(a) if isinstance(a, Path) else a for a in args))
    except ProcessRaisedException as e:
        lines = [x for x in str(e).strip().splitlines() if x.strip()]
        last = lines[-1] if lines else str(e)
        raise CheckpointError(re.sub(r"^[\w.]+(Error|Exception): ", "", last)) from None


def _spawn_one(worker, *args) -> Path:
    _spawn(worker, 1, *args)
    return Path(args[-1])


def _export_worker(rank, world, port, step_dir, dst):
    """mcore-to-hf of a training checkpoint: its policy loaded in one process (TP = PP = 1), exported."""
    from megaapo import dist_checkpoint as dckpt
    from megaapo.config import ModelConfig, ParallelConfig
    from megaapo.distributed import destroy, init_distributed, set_rank_env

    set_rank_env(rank, world, port)
    groups = init_distributed()
    step = _training_step_dir(Path(step_dir))
    dtype = _checkpoint_dtype(step)
    dckpt.load_policy(step, groups, ModelConfig(dtype=dtype), ParallelConfig()).export_hf(dst)
    destroy()


def _checkpoint_dtype(step_dir: Path) -> str:
    """The learner dtype a format-2 checkpoint was trained in (its embedding's dtype)."""
    from megatron.core import dist_checkpointing

    from megaapo import dist_checkpoint as dckpt
    from megaapo.models.qwen2_5_vl.config import DTYPES

    meta = dist_checkpointing.load_tensors_metadata(str(step_dir / dckpt.DIST))
    dtype = meta["lm.embedding.word_embeddings.weight"].dtype
    return next(name for name, t in DTYPES.items() if t == dtype)


def _reshard_worker(rank, world, port, step_dir, dst, tp, pp):
    """One rank of `reshard` for a training checkpoint: load at tp x pp, write to dst (format 2)."""
    from megatron.core import dist_checkpointing

    from megaapo import checkpoint as ckpt
    from megaapo import dist_checkpoint as dckpt
    from megaapo.config import ModelConfig, OptimConfig, ParallelConfig
    from megaapo.distributed import destroy, init_distributed, set_rank_env
    from megaapo.learner import Learner

    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    groups = init_distributed(tp, pp)
    step_dir, par = Path(step_dir), ParallelConfig(tp=tp, pp=pp)
    if dckpt.format_of(step_dir) >= 2:
        common = dist_checkpointing.load_common_state_dict(str(step_dir / dckpt.DIST))
        model_cfg = ModelConfig(dtype=_checkpoint_dtype(step_dir))
        optim_cfg = OptimConfig(impl=common["policy"]["optimizer"]["impl"])
        hf = step_dir / dckpt.HF
        policy = Learner(hf, groups, model_cfg, par, optim_cfg, load_weights=False)
        meta = ckpt.read_meta(step_dir)
        ref = Learner(hf, groups, model_cfg, par, None, load_weights=False) if "ref" in meta.get("contents", ()) \
            else None
        state = {"policy": policy.sharded_state_dict(is_loading=True)}
        if ref is not None:
            state["ref"] = ref.sharded_state_dict(prefix="ref.", optimizer=False)
        loaded, meta = dckpt.read(step_dir, state, groups)
        policy.load_sharded_state_dict(loaded["policy"])
        if ref is not None:
            ref.load_sharded_state_dict(loaded["ref"], prefix="ref.")
    else:
        from megaapo import legacy_checkpoint

        run = _format1_run_config(step_dir)
        hf = _format1_model(step_dir, run)
        policy = Learner(hf, groups, run.model, par, run.optim)
        files = ckpt.read_manifest(step_dir)["files"]
        ref = Learner(hf, groups, run.model, par, None) if any(f.startswith("ref.rank") for f in files) else None
        meta = legacy_checkpoint.load(step_dir, policy, ref).meta
    # RNG streams are not carried over: they belong to the ranks of the run that drew them.
    state = {"policy": policy.sharded_state_dict()}
    if ref is not None:
        state["ref"] = ref.sharded_state_dict(prefix="ref.", optimizer=False)
    meta = {**meta, "contents": sorted(state)}
    saver = dckpt.Checkpointer(dst, groups, async_save=False)
    saver.save(int(ckpt.read_manifest(step_dir)["step"]), state, meta if rank == 0 else None, hf_dir=policy.hf_dir)
    saver.close()
    destroy()


class _TensorReader:
    """HFReader's interface over tensors in memory (reshard of an hf-to-mcore directory)."""

    class _Slice:
        def __init__(self, t: torch.Tensor):
            self.t = t

        def get_shape(self) -> list[int]:
            return list(self.t.shape)

        def __getitem__(self, idx):
            return self.t[idx]

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]):
        self.path, self.tensors = path, tensors

    def keys(self) -> list[str]:
        return sorted(self.tensors)

    def slice(self, name: str):
        return self._Slice(self.get(name))

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        return self.tensors[name]


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="rank", disable=not enabled)
