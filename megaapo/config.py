"""The one typed config tree of a megaapo run: dataclasses, YAML presets, dotted CLI overrides, validation.

Who calls it: the CLI (`megaapo config|train|sft|eval|data ...`) builds a `MegaapoConfig` once with `load_config` and
hands each component only its own section (`cfg.algo` to the loss, `cfg.rollout` to the engines, ...).

A preset in `configs/` is a small YAML override set on top of the dataclass defaults below; CLI overrides are
dotted (`algo.kl_coef=0.04`). Every key, type, choice and range is checked before anything starts, and a mistake
is reported as one `ConfigError` naming the key and the valid choices ("did you mean ...").
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = "demo"


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key and the fix."""


def _opt(default: Any, *, choices: Optional[list] = None, ge: Optional[float] = None, gt: Optional[float] = None,
         le: Optional[float] = None, lt: Optional[float] = None, help: str = "") -> Any:
    """A dataclass field whose metadata carries the validation rules checked by `validate`."""
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------------- model
@dataclass
class TinyModelConfig:
    """Shape of the random-weight Qwen2.5-VL built when `model.path` is empty (CPU demos and tests)."""
    vocab: str = _opt("small", choices=["small", "real"], help="small: our byte-level BPE; real: Qwen2.5's 151,936")
    hidden_size: int = _opt(64, ge=16)
    num_layers: int = _opt(2, ge=1)
    # head_dim = hidden_size / num_heads must be one vLLM's CPU attention supports (32, 64, 80, ...), not 16.
    num_heads: int = _opt(2, ge=1)
    num_kv_heads: int = _opt(2, ge=1)
    intermediate_size: int = _opt(256, ge=1)
    vision_depth: int = _opt(2, ge=1)
    vision_hidden_size: int = _opt(64, ge=16)
    tie_embeddings: bool = False
    seed: int = 0


@dataclass
class ModelConfig:
    path: str = _opt("", help="HF Qwen2.5-VL directory; empty builds `tiny` into the run directory")
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = _opt("bfloat16", choices=["bfloat16", "float16", "float32"])
    attention: str = _opt("sdpa", choices=["sdpa", "te", "flash"])
    recompute: str = _opt("none", choices=["none", "selective", "full"])
    freeze_vision: bool = False
    ref_offload: bool = _opt(False, help="keep the reference model's weights on CPU between uses")


# ---------------------------------------------------------------------------------------------------------- data
@dataclass
class SynthConfig:
    """The embedded synthetic multimodal reasoning data (`megaapo data synth`)."""
    n_train: int = _opt(4000, ge=1)
    n_eval: int = _opt(200, ge=1)
    seed: int = 0
    tasks: list = _opt(["count", "bars", "digits"])
    levels: list = _opt([1, 2, 3])
    image_size: int = _opt(112, ge=28)


@dataclass
class DataConfig:
    train_path: str = _opt("", help="JSONL/Parquet file; empty generates the synthetic set into the run directory")
    eval_path: str = ""
    format: str = _opt("auto", choices=["auto", "megaapo", "view_r1", "r1vl", "mathvista", "mathverse",
                                        "conversation"])
    image_root: str = _opt("", help="base for relative image paths; empty means the data file's directory")
    prompt_style: str = _opt("r1", choices=["r1", "r1vl", "direct", "plain"],
                             help="r1: <think>/<answer>; r1vl: ### Step sections; direct: answer only; plain: the "
                                  "question as written (conversation data that carries its own instruction)")
    system_prompt: str = ""
    min_pixels: int = _opt(3136, ge=784)
    max_pixels: int = _opt(1003520, ge=784)
    max_prompt_tokens: int = _opt(4096, ge=16, help="longer prompts are skipped, never truncated")
    shuffle: bool = True
    seed: int = 0
    synth: SynthConfig = field(default_factory=SynthConfig)


# ------------------------------------------------------------------------------------------------------- rollout
@dataclass
class RolloutConfig:
    engine: str = _opt("vllm", choices=["vllm"])
    mode: str = _opt("disaggregated", choices=["disaggregated", "colocated"])
    num_engines: int = _opt(1, ge=1)
    tensor_parallel_size: int = _opt(1, ge=1)
    prompts_per_step: int = _opt(128, ge=1)
    n_samples: int = _opt(8, ge=1, help="G, responses per prompt")
    temperature: float = _opt(1.0, gt=0.0)
    top_p: float = _opt(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = _opt(1024, ge=1)
    stop: list = _opt([])
    gpu_memory_utilization: float = _opt(0.6, gt=0.0, le=1.0)
    enforce_eager: bool = False
    request_timeout_s: float = _opt(600.0, gt=0.0)
    start_timeout_s: float = _opt(600.0, gt=0.0)
    sync_bucket_mb: int = _opt(512, ge=1)
    sync_checksum: bool = _opt(False, help="engines checksum every tensor they load; a mismatch stops the run")
    sync_backend: str = _opt("auto", choices=["auto", "gloo", "nccl", "ipc"],
                             help="vLLM weight-transfer backend; auto: ipc when colocated, else nccl on CUDA, gloo")
    tis_cap: float = _opt(0.0, ge=0.0, help="truncated importance sampling cap; 0 disables the correction")
    max_staleness: int = _opt(0, ge=0, help="k: the engines generate up to k batches ahead of the learner, never "
                                            "from weights more than k syncs old; 0: the synchronous loop")
    stale_batches: str = _opt("wait", choices=["wait", "drop"],
                              help="k>=1: wait (the producer waits for newer weights) or drop (it runs ahead; the "
                                   "learner drops batches more than k syncs old, counted)")
    off_policy: str = _opt("decoupled", choices=["decoupled", "tis", "none"],
                           help="k>=1 correction: decoupled PPO (ratio against the learner's pi_old, times "
                                "pi_old/pi_behaviour), tis (that weight truncated at rollout.tis_cap, default 2), "
                                "none (pi_old = the engine's behaviour log-probs)")
    partial: bool = _opt(False, help="k>=1: a weight update pauses generation in place and the sequences continue "
                                     "on the new weights (per-token versions and behaviour log-probs)")
    proximal: str = _opt("recompute", choices=["recompute", "update"],
                         help="k>=1 with decoupled/tis: pi_old is the learner's log-probs at the start of the step "
                              "(recompute: one more forward pass over the batch) or each update's own, detached "
                              "(update: no extra pass; every mini-batch's clipped ratio then starts at 1)")
    max_model_len: int = _opt(0, ge=0, help="engine context length (prompt + response); 0: the model's own")
    max_images_per_prompt: int = _opt(1, ge=0)
    addresses: list = _opt([], help="running engines (tcp://host:port, one per engine; see megaapo.rollout.server); "
                                    "empty: the trainer starts num_engines engines itself")
    sync_host: str = _opt("", help="address engines use to reach the trainer's weight-sync rank; empty: automatic")
    engine_cpus: list = _opt([], help="CPU runs: the cores the engines the trainer starts run on (their OpenMP "
                                      "threads, one per core, and every other thread); empty: vLLM's default")
    engine_gpus: list = _opt([], help="GPUs (as CUDA_VISIBLE_DEVICES names them) for the engines the trainer "
                                      "starts, num_engines x tensor_parallel_size of them in engine order; empty: the "
                                      "node's GPUs after the trainer processes' (docs/rollout.md, Placement)")


# ---------------------------------------------------------------------------------------------------------- algo
@dataclass
class OverlongConfig:
    """DAPO's soft overlong punishment, added to the reward."""
    enable: bool = False
    buffer_tokens: int = _opt(256, ge=1)
    penalty: float = _opt(1.0, ge=0.0)


@dataclass
class AlgoConfig:
    name: str = _opt("grpo", choices=["apo", "stepgrpo", "grpo", "drgrpo", "dapo", "rloo", "reinforce_pp"])
    advantage: str = _opt("grpo", choices=["grpo", "drgrpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
    adv_eps: float = _opt(1e-6, ge=0.0)
    std_unbiased: bool = True
    policy_loss: str = _opt("ppo_clip", choices=["ppo_clip", "vanilla"])
    clip_eps_low: float = _opt(0.2, ge=0.0, lt=1.0)
    clip_eps_high: float = _opt(0.2, ge=0.0)
    loss_agg: str = _opt("token_mean", choices=["token_mean", "seq_mean_token_mean", "seq_sum_norm"])
    loss_agg_norm_len: int = _opt(0, ge=0, help="seq_sum_norm's constant; 0 means rollout.max_new_tokens")
    kl_coef: float = _opt(0.0, ge=0.0)
    kl_estimator: str = _opt("k3", choices=["k1", "k2", "k3"])
    kl_agg: str = _opt("seq_mean_token_mean", choices=["token_mean", "seq_mean_token_mean", "seq_sum_norm"])
    entropy_coef: float = _opt(0.0, ge=0.0)
    dads: bool = _opt(False, help="APO: difficulty-adaptive KL weight for correct responses")
    stcr: bool = _opt(False, help="APO: amplify negative advantages of over-long wrong responses")
    stcr_base: float = _opt(1.00001, gt=1.0)
    faithful_to: str = _opt("paper", choices=["paper", "code"])
    dynamic_sampling: bool = _opt(False, help="DAPO: drop groups whose rewards are all equal")
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    updates_per_batch: int = _opt(1, ge=1, help="optimizer updates per rollout batch: the batch is split into this "
                                                "many mini-batches of whole groups, one update each")
    old_logprob: str = _opt("learner", choices=["learner", "rollout"],
                            help="pi_old for the PPO ratio: recomputed by the learner (a forward pass), or the engine's "
                                 "sampled-token log-probs (same weights; exact in fp32, approximate in bf16)")


# -------------------------------------------------------------------------------------------------------- reward
@dataclass
class RewardConfig:
    functions: dict = _opt({"accuracy": 1.0, "format": 0.5}, help="registered reward name -> weight")
    step_alpha: float = _opt(0.1, ge=0.0, help="StepRAR's weight of the matched key-step fraction")
    faithful_to: str = _opt("paper", choices=["paper", "code"],
                            help="StepRAR/StepRVR as the R1-VL paper describes them, or exactly as the authors' "
                                 "script computes them (docs/rewards.md)")
    num_workers: int = _opt(2, ge=0, help="0 scores in-process (no timeout protection)")
    timeout_s: float = _opt(5.0, gt=0.0, help="per-response; a response past it scores 0 and is counted")


# --------------------------------------------------------------------------------------------------------- optim
@dataclass
class OptimConfig:
    impl: str = _opt("auto", choices=["auto", "megatron", "torch"],
                     help="megatron: megatron-core's DDP grad buffers + distributed optimizer (fp32 main weights and "
                          "Adam state sharded over data-parallel ranks); torch: torch.optim.AdamW on every rank; "
                          "auto: megatron on GPU, torch on CPU")
    lr: float = _opt(1e-6, gt=0.0)
    min_lr: float = _opt(0.0, ge=0.0)
    schedule: str = _opt("cosine", choices=["cosine", "constant", "linear"],
                         help="over the run's optimizer updates: RL makes algo.updates_per_batch per step")
    warmup_ratio: float = _opt(0.0, ge=0.0, le=1.0)
    betas: list = _opt([0.9, 0.999])
    eps: float = _opt(1e-8, gt=0.0)
    weight_decay: float = _opt(0.0, ge=0.0, help="not applied to biases and 1-D parameters (norms), as in Megatron")
    grad_clip: float = _opt(1.0, ge=0.0)
    nonfinite: str = _opt("stop", choices=["skip", "stop"],
                          help="an update whose loss or gradient norm is NaN/inf never touches the weights: skip it "
                               "(counted and logged) and go on, or stop the run with an error once "
                               "nonfinite_patience updates in a row were skipped")
    nonfinite_patience: int = _opt(3, ge=1, help="with nonfinite=stop: this many skipped updates in a row stop the run")


# ------------------------------------------------------------------------------------------------------ parallel
@dataclass
class ParallelConfig:
    tp: int = _opt(1, ge=1)
    pp: int = _opt(1, ge=1)
    micro_batch_tokens: int = _opt(8192, ge=1, help="token budget of one micro-batch (padding included)")
    sequence_packing: bool = _opt(True, help="several samples per row, attention per sample by a variable-length "
                                             "kernel (no padding); off: right-padded rows of similar length")
    backend: str = _opt("auto", choices=["auto", "nccl", "gloo"])


# ------------------------------------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    output_dir: str = "runs/default"
    device: str = _opt("auto", choices=["auto", "cpu", "cuda"])
    seed: int = 0
    total_steps: int = _opt(100, ge=0)
    sft_warmup_steps: int = _opt(0, ge=0, help="supervised steps on the answer format before RL")
    sft_lr: float = _opt(1e-5, gt=0.0)
    eval_every: int = _opt(0, ge=0)
    eval_size: int = _opt(200, ge=1)
    threads: int = _opt(0, ge=0, help="torch CPU threads; 0 leaves torch's default")
    cpus: list = _opt([], help="CPU cores the trainer process (and the reward workers it starts) may run on; empty: "
                               "all. With rollout.engine_cpus this gives each side of an asynchronous run its own")
    cpu_split: bool = _opt(False, help="CPU runs whose single trainer process starts CPU engines: the trainer takes "
                                       "the first half of the cores it was started on (trainer.cpus, one torch thread "
                                       "each) and the engines the rest (rollout.engine_cpus); on 2 cores one each. "
                                       "Skipped, with a log line, where trainer.cpus or rollout.engine_cpus is set")
    dry_run: bool = False
    gpu: str = _opt("auto", help="the GPU the memory plan checks against: auto (the device's own on GPU runs; no "
                                 "check on CPU runs), a name (h100-80gb, h200-141gb, a100-80gb, a100-40gb, l40s-48gb) "
                                 "or a size such as 80gib")
    memory_check: bool = _opt(True, help="plan the step's GPU memory at start-up and refuse a layout that cannot fit")


# ------------------------------------------------------------------------------------------------------- logging
@dataclass
class LoggingConfig:
    wandb: str = _opt("auto", choices=["auto", "online", "offline", "disabled"],
                      help="auto: online with WANDB_API_KEY, offline run directory otherwise")
    project: str = "megaapo"
    entity: str = _opt("", help="W&B team or user; empty uses the account's default")
    run_name: str = ""
    tags: list = _opt([], help="W&B run tags")
    console_every: int = _opt(1, ge=1)
    jsonl: bool = True
    plot: bool = True


# ---------------------------------------------------------------------------------------------------- checkpoint
@dataclass
class CheckpointConfig:
    dir: str = _opt("", help="empty means <trainer.output_dir>/checkpoints")
    every: int = _opt(0, ge=0)
    keep_last: int = _opt(2, ge=1)
    resume: str = _opt("auto", help="auto | none | a checkpoint directory")
    save_on_sigterm: bool = _opt(True, help="on SIGTERM/SIGUSR1 (SLURM pre-emption) save at the next step, then exit")
    checksum: bool = _opt(True, help="an XXH3-128 checksum of every file in the manifest, verified before a checkpoint "
                                     "is resumed (a file changed in place is refused); costs docs/faults.md")
    async_save: bool = _opt(True, help="write checkpoints in the background (megatron-core's async save) while "
                                       "training goes on; a checkpoint is visible only once complete")
    export_hf: bool = True


# ----------------------------------------------------------------------------------------------------------- sft
@dataclass
class SFTConfig:
    """`megaapo sft`: supervised fine-tuning of the learner (R1-VL's warm-up stage). Steps, learning rate, parallel
    layout, checkpoints and logging come from `trainer`, `optim`, `parallel`, `checkpoint` and `logging`, as in RL."""
    batch_size: int = _opt(32, ge=1, help="sequences per optimizer step")
    epochs: float = _opt(0.0, ge=0.0, help="> 0 sets trainer.total_steps to this many passes over the training rows")
    target: str = _opt("auto", choices=["auto", "solution", "answer"],
                       help="what the assistant turn is: the row's solution (conversation rows: the assistant's "
                            "text), only the answer in the prompt style's format, or auto (solution when present)")
    eval_generate: bool = _opt(True, help="at each eval, also generate greedily with a vLLM engine on the held-out "
                                          "prompts and score accuracy and format (StepRVR validity for r1vl)")


# ---------------------------------------------------------------------------------------------------------- eval
@dataclass
class EvalConfig:
    """`megaapo eval`: score a checkpoint on benchmark files with the training reward code."""
    benchmarks: dict = _opt({}, help="name -> JSONL/Parquet file; empty: data.eval_path (or the synthetic held-out "
                                     "split)")
    format: str = _opt("auto", choices=["auto", "megaapo", "view_r1", "r1vl", "mathvista", "mathverse",
                                        "conversation"])
    image_root: str = _opt("", help="base for relative image paths; empty means each benchmark file's directory")
    k: int = _opt(1, ge=1, help="samples per prompt; k > 1 also reports pass@k")
    temperature: float = _opt(0.0, ge=0.0, help="0 is greedy (k must be 1); sampled k > 1 needs > 0")
    max_new_tokens: int = _opt(0, ge=0, help="0: rollout.max_new_tokens")
    limit: int = _opt(0, ge=0, help="at most this many rows per benchmark; 0: all")
    output_dir: str = _opt("", help="empty: <trainer.output_dir>/eval")
    seed: int = 0


@dataclass
class MegaapoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------------- loading
def resolve_preset(name_or_path: str) -> Path:
    """`demo`, `demo.yaml`, `configs/demo.yaml` or any YAML path -> the file; unknown names list the presets."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    candidate = CONFIG_DIR / f"{stem}.yaml"
    if candidate.is_file():
        return candidate
    presets = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config file or preset named {name_or_path!r}{_did_you_mean(stem, presets)}; "
                      f"presets: {', '.join(presets)}")


def load_config(preset: Optional[str] = None, overrides: Optional[list[str]] = None) -> MegaapoConfig:
    """Defaults <- preset YAML <- dotted overrides, checked, as a typed `MegaapoConfig`."""
    schema = OmegaConf.structured(MegaapoConfig)
    layers: list[tuple[str, dict, Optional[list[str]]]] = []   # (source, data, mapping paths it replaces)
    if preset is not None:
        path = resolve_preset(preset)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
        layers.append((str(path), data, None))
    if overrides:
        layers.append(("command line", *_parse_overrides(overrides)))
    merged = schema
    for source, data, replaced in layers:
        _check_keys(data, MegaapoConfig, prefix="", source=source)
        try:
            _clear_replaced_dicts(merged, data, MegaapoConfig, only=replaced)
            merged = OmegaConf.merge(merged, OmegaConf.create(data))
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            raise ConfigError(f"{source}: {key}: {_first_line(e)}") from None
    cfg: MegaapoConfig = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def to_yaml(cfg: MegaapoConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    """A plain dict of any config section (for W&B, checkpoints and logs)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def _parse_overrides(overrides: list[str]) -> tuple[dict, list[str]]:
    """Dotted overrides -> (nested dict, the keys given a whole mapping, e.g. reward.functions={step_rar: 1})."""
    out: dict = {}
    whole: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. algo.kl_coef=0.04)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
        if isinstance(value, dict):
            whole.append(key.strip())
    return out, whole


def _check_keys(data: dict, schema: type, prefix: str, source: str) -> None:
    """Unknown keys fail with the closest valid key; the walk follows nested dataclasses only."""
    valid = {f.name: f for f in fields(schema)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in valid:
            raise ConfigError(f"{source}: unknown key {full!r}{_did_you_mean(str(key), list(valid), prefix)}; "
                              f"valid keys here: {', '.join(valid)}")
        ftype = _dataclass_type(schema, key)
        if ftype is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {full!r} is a section; set its keys, e.g. {full}.<key>=...")
            _check_keys(value, ftype, prefix=f"{full}.", source=source)


def _dataclass_type(schema: type, name: str) -> Optional[type]:
    value = getattr(schema(), name)
    return type(value) if is_dataclass(value) else None


def _clear_replaced_dicts(merged: DictConfig, data: dict, schema: type, prefix: str = "",
                          only: Optional[list[str]] = None) -> None:
    """A mapping-valued option (reward.functions) given whole replaces the previous mapping; OmegaConf would union
    them. A YAML layer always gives mappings whole; on the command line only `key={...}` does (`key.name=v` edits
    one entry)."""
    default = schema()
    for key, value in data.items():
        sub = getattr(default, key)
        if is_dataclass(sub) and isinstance(value, dict):
            _clear_replaced_dicts(merged, value, type(sub), f"{prefix}{key}.", only)
        elif isinstance(sub, dict) and (only is None or f"{prefix}{key}" in only):
            OmegaConf.update(merged, f"{prefix}{key}", {}, merge=False)


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every field's choices and range, then the rules that span sections."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        full = f"{prefix}{f.name}"
        if is_dataclass(value):
            validate(value, prefix=f"{full}.")
            continue
        m = f.metadata
        if m.get("choices") is not None and value not in m["choices"]:
            raise ConfigError(f"{full}={value!r} is not one of {', '.join(map(str, m['choices']))}"
                              f"{_did_you_mean(str(value), [str(c) for c in m['choices']])}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{full}={value} must be a finite number")
            for op, bound, ok in (("ge", m.get("ge"), lambda v, b: v >= b), ("gt", m.get("gt"), lambda v, b: v > b),
                                  ("le", m.get("le"), lambda v, b: v <= b), ("lt", m.get("lt"), lambda v, b: v < b)):
                if bound is not None and not ok(value, bound):
                    sym = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[op]
                    raise ConfigError(f"{full}={value} is out of range: must be {sym} {bound}")
    if prefix == "" and isinstance(cfg, MegaapoConfig):
        _validate_cross(cfg)


def _validate_cross(cfg: MegaapoConfig) -> None:
    from megaapo.rewards import REWARDS  # late import: rewards import nothing from config, keep it that way

    for name, weight in cfg.reward.functions.items():
        if name not in REWARDS:
            raise ConfigError(f"reward.functions: unknown reward {name!r}{_did_you_mean(name, list(REWARDS))}; "
                              f"registered: {', '.join(sorted(REWARDS))}")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ConfigError(f"reward.functions.{name}={weight!r} must be a number (its weight)")
    if not cfg.reward.functions:
        raise ConfigError("reward.functions is empty: name at least one reward, e.g. reward.functions={accuracy: 1}")
    if cfg.data.min_pixels > cfg.data.max_pixels:
        raise ConfigError(f"data.min_pixels={cfg.data.min_pixels} exceeds data.max_pixels={cfg.data.max_pixels}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas={cfg.optim.betas} must be two numbers in [0, 1)")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr={cfg.optim.min_lr} exceeds optim.lr={cfg.optim.lr}")
    if cfg.algo.advantage != "reinforce_pp" and cfg.rollout.n_samples < 2:
        raise ConfigError(f"rollout.n_samples={cfg.rollout.n_samples}: group advantages ({cfg.algo.advantage}) "
                          "need at least 2 responses per prompt")
    if cfg.eval.k > 1 and cfg.eval.temperature <= 0:
        raise ConfigError(f"eval.k={cfg.eval.k} samples per prompt need eval.temperature > 0 (0 is greedy: k copies "
                          "of one answer)")
    if cfg.rollout.mode == "colocated":
        _validate_colocated(cfg)
    if cfg.trainer.gpu != "auto":
        from megaapo.memory.plan import gpu_bytes  # the memory plan owns its GPU names

        try:
            gpu_bytes(cfg.trainer.gpu)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _validate_async(cfg.rollout)
    backend, colocated = cfg.rollout.sync_backend, cfg.rollout.mode == "colocated"
    if backend != "auto" and (backend == "ipc") != colocated:
        raise ConfigError(f"rollout.sync_backend={backend} does not fit rollout.mode={cfg.rollout.mode}: a colocated "
                          "engine shares the trainer's GPU and takes its weights by CUDA IPC (ipc); engines of their "
                          "own take them over a process group (nccl on GPUs, gloo on CPU); or leave it at auto")
    t = cfg.model.tiny
    if t.hidden_size % t.num_heads or t.num_heads % t.num_kv_heads or (t.hidden_size // t.num_heads) % 8:
        raise ConfigError(f"model.tiny: hidden_size={t.hidden_size} must split into num_heads={t.num_heads} heads of "
                          f"a multiple of 8 dims, and num_heads must be a multiple of num_kv_heads={t.num_kv_heads}")
    from megaapo.data.synth import TASKS  # the synthetic generator owns its task names

    for task in cfg.data.synth.tasks:
        if task not in TASKS:
            raise ConfigError(f"data.synth.tasks: unknown task {task!r}{_did_you_mean(task, list(TASKS))}; "
                              f"tasks: {', '.join(TASKS)}")
    for level in cfg.data.synth.levels:
        if level not in (1, 2, 3):
            raise ConfigError(f"data.synth.levels: {level!r} is not one of 1, 2, 3")


def _validate_colocated(cfg: MegaapoConfig) -> None:
    """Colocated mode is one vLLM engine inside one trainer process. vLLM built inside a torch.distributed world
    sets up its groups over every rank of it, so an engine on one rank of several would wait for the others; an
    engine per rank would need vLLM's external launcher, which megaapo does not run. The number of data-parallel
    processes is known only at launch: `megaapo.rollout.placement.plan` refuses more than one there."""
    r, p = cfg.rollout, cfg.parallel
    if cfg.trainer.device == "cpu":
        raise ConfigError("rollout.mode=colocated needs GPUs (vLLM sleep mode); use rollout.mode=disaggregated on CPU")
    if p.tp > 1 or p.pp > 1:
        raise ConfigError(f"rollout.mode=colocated runs one vLLM engine inside a single trainer process, but "
                          f"parallel.tp={p.tp} x parallel.pp={p.pp} needs {p.tp * p.pp} trainer processes (an engine "
                          "per rank, vLLM's external launcher, is not supported); use rollout.mode=disaggregated")
    if r.num_engines != 1 or r.tensor_parallel_size != 1:
        raise ConfigError(f"rollout.mode=colocated supports one engine with tensor_parallel_size=1 (it lives in the "
                          f"trainer process), not rollout.num_engines={r.num_engines} x rollout.tensor_parallel_size="
                          f"{r.tensor_parallel_size}; use rollout.mode=disaggregated for more")
    if r.addresses or r.engine_gpus:
        raise ConfigError("rollout.mode=colocated runs its engine in the trainer process on the trainer's GPU: "
                          "rollout.addresses and rollout.engine_gpus are for rollout.mode=disaggregated")


def _validate_async(r) -> None:
    if r.max_staleness and r.mode == "colocated":
        raise ConfigError(f"rollout.max_staleness={r.max_staleness} needs engines on GPUs of their own: a colocated "
                          "engine shares the learner's GPU and sleeps while it trains, so there is nothing to overlap; "
                          "use rollout.mode=disaggregated or rollout.max_staleness=0")
    if r.partial and not r.max_staleness:
        raise ConfigError("rollout.partial=true continues sequences across weight updates, which only happen during "
                          "generation when it runs ahead of the learner: set rollout.max_staleness >= 1")


def _did_you_mean(word: str, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
