"""Everything one run holds besides the loop: building the parts, resume, warm-up, eval, logging, checkpoints.

`megaapo.train.main` (RL) and `megaapo.sft.main` (supervised) enter a `Run` and read like their algorithm; the
mechanics they need live here, shared, so both have the same layouts, checkpoints and metrics. Ranks: global
rank 0 drives the rollout engines, scores rewards, evaluates and owns metrics (the last pipeline stage sends it the
loss metrics); every trainer rank holds its learner shards and writes them into the checkpoints (megatron-core's
dist_checkpointing through megaapo.dist_checkpoint, in the background while training goes on).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
import contextlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megaapo import checkpoint as ckpt
from megaapo import dist_checkpoint as dckpt
from megaapo import rundir

log = logging.getLogger("megaapo.train")



def optimizer_steps(cfg, job: str) -> int:
    """The learning-rate schedule's length: the run's optimizer steps. An RL step makes `algo.updates_per_batch`
    updates (one per mini-batch); an SFT step makes one."""
    return cfg.trainer.total_steps * (cfg.algo.updates_per_batch if job == "rl" else 1)

class Run:
    def __init__(self, cfg, job: str = "rl"):
        assert job in ("rl", "sft"), job
        self.cfg, self.job = cfg, job
        self.placement = plan_run(cfg)   # before anything starts: a layout that cannot work stops here
        self.engines = self.scorer = self.reference = self.checkpointer = None
        self._heldout = None   # SFT's held-out samples, built at the first evaluation
        self._closers: list = []
        self.position = None            # the prompt stream's state after the last trained batch
        self._timeline_done = 0
        self._sync_wait = 0.0
        self._producer = None

    # ------------------------------------------------------------------ build
    def __enter__(self) -> "Run":
        try:
            self._build()
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)

    def _split_cpus(self) -> None:
        """`trainer.cpu_split`: trainer.cpus, rollout.engine_cpus and trainer.threads from the cores this process
        was started on, where the run has one CPU trainer process that starts CPU engines."""
        from megaapo import cpus

        cfg, engines = self.cfg, self.placement.engines
        why = ("trainer.cpus or rollout.engine_cpus is set" if cfg.trainer.cpus or cfg.rollout.engine_cpus else
               "the trainer runs on GPU" if self.placement.trainer_gpus else
               "this process starts no engine" if not engines else
               "the engines run on GPU" if any(engines) else
               "several trainer processes" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
        layout = None if why else cpus.split(cpus.given())
        if layout is None:
            log.info("trainer.cpu_split: cores left shared (%s)", why or f"started on one core, {cpus.given()}")
            return
        (cfg.trainer.cpus, cfg.rollout.engine_cpus), cfg.trainer.threads = layout, len(layout[0])
        log.info("trainer.cpu_split: trainer on core(s) %s with %d torch thread(s), engines on core(s) %s",
                 layout[0], len(layout[0]), layout[1])

    def _build(self) -> None:
        from transformers import AutoTokenizer

        from megaapo.assets import prepare_inputs
        from megaapo.config import to_dict, to_yaml
        from megaapo.data.prompts import PromptBuilder
        from megaapo.distributed import init_distributed
        from megaapo.experience import ImagePixels
        from megaapo.learner import Learner
        from megaapo.metrics import Metrics
        from megaapo.data.stream import PromptStream

        cfg = self.cfg
        as_given = to_yaml(cfg)   # config.yaml: the run as asked for (cpu_split, not this machine's core numbers)
        if cfg.trainer.cpu_split:
            self._split_cpus()
        if cfg.trainer.cpus:   # before any thread or child process exists that should inherit it
            from megaapo import cpus

            cpus.pin_process(cpus.check(cfg.trainer.cpus, "trainer.cpus"))
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        _seed_all(cfg.trainer.seed)
        self.groups = init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.backend)
        self.rank0 = dist.get_rank() == 0
        self.run_dir = Path(cfg.trainer.output_dir)
        self.ckpt_root = ckpt.checkpoint_root(cfg.checkpoint, self.run_dir)
        # Rank 0 builds the tiny model / synthetic data first; the others then find them ready.
        if self.rank0:
            self._lock()
            rundir.write_text(self.run_dir / "config.yaml", as_given)
            inputs = prepare_inputs(cfg.model, cfg.data, self.run_dir, supervised=self.job == "sft")
            for r in inputs.reports:
                log.info(r.summary())
        dist.barrier()
        if not self.rank0:
            inputs = prepare_inputs(cfg.model, cfg.data, self.run_dir, supervised=self.job == "sft")
        self.model_path = inputs.model_path
        self._check_memory()
        self.train, self.eval = inputs.train, inputs.eval[:cfg.trainer.eval_size]
        if self.job == "sft" and cfg.sft.epochs:
            cfg.trainer.total_steps = math.ceil(cfg.sft.epochs * len(self.train) / cfg.sft.batch_size)
            log.info("sft.epochs=%g over %d rows: %d steps", cfg.sft.epochs, len(self.train), cfg.trainer.total_steps)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        d = cfg.data
        self.builder = PromptBuilder(self.tokenizer, d.prompt_style, d.min_pixels, d.max_pixels,
                                     system_prompt=d.system_prompt)
        self.pixels = ImagePixels(self.model_path, d.min_pixels, d.max_pixels)
        if cfg.trainer.dry_run:
            log.info("dry run: config, data and the %dx%d layout are valid; nothing trained",
                     cfg.parallel.tp, cfg.parallel.pp)
            self.dry = True
            return
        self.dry = False
        # SFT generates only to evaluate (greedy held-out outputs); RL always needs its engines.
        job_is_rl = self.job == "rl"
        self.generates = job_is_rl or (cfg.sft.eval_generate and bool(self.eval))
        if self.rank0 and self.generates:
            # Before the learners: a colocated vLLM starts only if its share of the GPU is free (docs/rollout.md);
            # it then sleeps, and the learners are built in the memory it gave back.
            self._start_engines()
            self.engines.sleep()
        self.policy = Learner(self.model_path, self.groups, cfg.model, cfg.parallel, cfg.optim,
                              total_steps=optimizer_steps(cfg, self.job))
        if job_is_rl and cfg.algo.kl_coef > 0:
            self.reference = Learner(self.model_path, self.groups, cfg.model, cfg.parallel, None)
        self.stream = PromptStream(len(self.train), d.seed, d.shuffle)
        self.state = ckpt.TrainState()
        c = cfg.checkpoint
        self.checkpointer = dckpt.Checkpointer(self.ckpt_root, self.groups, keep_last=c.keep_last,
                                               async_save=c.async_save, checksum=c.checksum)
        resumed = self._resume()
        # The checkpoint's own step was logged by the run that wrote it; this run's first row is the next one.
        self.metrics = Metrics(cfg.logging, self.run_dir, to_dict(cfg), enabled=self.rank0,
                               start_step=self.state.step + 1 if resumed else 0, run_id=self.state.run_id,
                               kind=self.job)
        self.state.run_id = self.metrics.run_id
        self.stop = None
        if job_is_rl and not resumed and cfg.trainer.sft_warmup_steps:
            self.warmup()
            if self.reference is not None:
                # KL is measured against the policy RL starts from, not the random initialisation.
                self.reference.copy_weights_from(self.policy)
        self._engines_ready()
        from megaapo.rollout.transfer import WeightSync

        # Every rank: the policy's weights as vLLM's WeightSource, sent over the engines' transfer backend.
        self.weight_sync = WeightSync(self.policy, self.engines, cfg.rollout)
        if job_is_rl and (resumed or cfg.trainer.sft_warmup_steps):
            self.weight_sync.send(self.policy.version)
        # SFT always measures where it starts, so its outcome line can say what the fine-tuning changed.
        if not resumed and (cfg.trainer.eval_every or not job_is_rl):
            self.log(0, self.evaluate(0))
        # From here on SIGTERM/SIGUSR1 mean "save at the next step and exit"; before, they simply stop the start-up.
        self.stop = ckpt.install_stop_handler() if cfg.checkpoint.save_on_sigterm else None

    def _check_memory(self) -> None:
        """RL: refuse a layout whose step cannot fit its GPUs, before any learner or engine takes memory (the plan
        is made on rank 0, the verdict shared). A plan that cannot be made is a warning, not a stop."""
        from megaapo.memory import MemoryPlanError, startup_check

        if self.job != "rl":
            return
        problem = None
        if self.rank0:
            try:
                startup_check(self.cfg, self.model_path, dist.get_world_size(), self.groups.device.type == "cuda")
            except MemoryPlanError as e:
                problem = str(e)
            except Exception as e:   # noqa: BLE001 - the check is advice; a bug in it must not stop a run
                log.warning("memory plan could not be made (%s: %s); starting without the check",
                            type(e).__name__, e)
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            raise MemoryPlanError(box[0])

    def _start_engines(self) -> None:
        from megaapo.rewards.pool import RewardScorer
        from megaapo.rollout import make_rollout

        cfg = self.cfg
        self._engines_t0 = time.perf_counter()
        # The engine processes load (import vLLM, build the model) while this process builds its learners and
        # does the warm-up: `_engines_ready`. A colocated engine is built here, in this process, before them.
        self.engines = make_rollout(cfg.rollout, self.model_path, cfg.model.dtype, min_pixels=cfg.data.min_pixels,
                                    max_pixels=cfg.data.max_pixels, log_dir=self.run_dir / "engines", wait=False,
                                    placement=self.placement)
        self._closers.append(self.engines.shutdown)
        from megaapo.evaluate import eval_rewards

        functions = dict(cfg.reward.functions) if self.job == "rl" else eval_rewards(cfg.data.prompt_style)
        self.scorer = RewardScorer(functions, num_workers=cfg.reward.num_workers,
                                   timeout_s=cfg.reward.timeout_s, alpha=cfg.reward.step_alpha,
                                   faithful_to=cfg.reward.faithful_to)
        self._closers.append(self.scorer.close)

    def _engines_ready(self) -> None:
        if self.engines is not None:
            self.engines.ready()
            log.info("%d rollout engine(s) ready %.1fs after their start", self.cfg.rollout.num_engines,
                     time.perf_counter() - self._engines_t0)

    def _lock(self) -> None:
        """One writer per run directory (and per checkpoint root elsewhere), taken before anything is written; a
        no-op where `megaapo train`/`sft` already took it. Released when the run closes."""
        for d, what in ((self.run_dir, "run directory"), (self.ckpt_root, "checkpoint directory")):
            if d == self.run_dir or self.run_dir.resolve() not in d.resolve().parents:
                self._closers.append(rundir.acquire(d, what).release)

    def _resume(self) -> bool:
        """Every rank: the verified checkpoint to continue from (or a fresh start). Rank 0 first moves aside what
        the continuation would otherwise destroy: everything of an earlier run before a fresh start, checkpoints
        newer than the one resumed (refused ones, or another timeline after resuming an older one)."""
        path = ckpt.resolve_resume(self.cfg.checkpoint, self.ckpt_root, group=dist.group.WORLD)
        why = None if path is None else ckpt.why_this_checkpoint(self.ckpt_root, path)   # before anything moves
        if self.rank0:
            after = -1 if path is None else int(ckpt.read_manifest(path)["step"])
            newer = [p for step, p in ckpt.list_checkpoints(self.ckpt_root) if step > after and p != path]
            rundir.archive_history(self.run_dir, newer, metrics=path is None)
        if path is None:
            return False
        if dckpt.format_of(path) == 1:
            from megaapo import legacy_checkpoint

            loaded = legacy_checkpoint.load(path, self.policy, self.reference, verified=True)
            ckpt.restore_rng(loaded.shards["rng"])
            meta, how = loaded.meta, "megaapo's format 1, converted on load: the next checkpoint is in the new format"
        else:
            meta, how = self._load(path)
        self.state = ckpt.TrainState.from_dict(meta["train_state"])
        self.stream.load(self.state.data_position)
        log.info("resumed from %s (step %d, weight version %d): %s; %s", path, self.state.step,
                 self.state.weight_version, why, how)
        return True

    def _load(self, path: Path) -> tuple[dict, str]:
        """Read a format-2 checkpoint at this run's layout (whatever layout wrote it); nothing changes before every
        tensor has been read."""
        contents = ckpt.read_meta(path).get("contents", ())
        state = self._checkpoint_state(loading=True, with_ref="ref" in contents)
        same = dckpt.same_layout(path, self.groups) and "rng" in contents
        if not same:
            del state["rng"]   # RNG streams belong to the ranks that drew them
        loaded, meta = dckpt.read(path, state, self.groups, verified=True)   # resolve_resume verified it
        self.policy.load_sharded_state_dict(loaded["policy"])
        if "ref" in loaded:
            self.reference.load_sharded_state_dict(loaded["ref"], prefix="ref.")
        if same:
            ckpt.restore_rng(loaded["rng"])
            return meta, "same layout"
        was = ckpt.read_manifest(path)["layout"]
        where = "no RNG streams in it" if was == dckpt.layout_of(self.groups) else \
            f"resharded from tp={was['tp']} pp={was['pp']} dp={was['dp']}"
        return meta, f"{where} (RNG streams continue from trainer.seed, not from the checkpoint)"

    def _checkpoint_state(self, loading: bool = False, with_ref: bool = False) -> dict:
        """What a checkpoint holds besides the meta, as a sharded state dict: the policy with its optimizer, the
        reference model when no file holds it (it is the warmed-up policy), this rank's RNG streams."""
        state = {"policy": self.policy.sharded_state_dict(is_loading=loading),
                 "rng": dckpt.rng_sharded_object(None if loading else ckpt.capture_rng())}
        if with_ref and self.reference is not None:
            state["ref"] = self.reference.sharded_state_dict(prefix="ref.", optimizer=False)
        return state

    # ------------------------------------------------------------------ phases
    def warmup(self) -> None:
        """Supervised format warm-up (random answers: the format, no visual content)."""
        from megaapo.supervised import build_samples, sft_step

        cfg = self.cfg
        rng = random.Random(cfg.trainer.seed)
        answers = sorted({e.answer for e in self.train})
        batch = 32
        for step in range(cfg.trainer.sft_warmup_steps):
            examples = [self.train[rng.randrange(len(self.train))] for _ in range(batch)]
            samples = build_samples(examples, self.builder, self.tokenizer, self.pixels, self.policy,
                                    random_labels=True, rng=rng, answers=answers)
            m = sft_step(self.policy, samples, lr=cfg.trainer.sft_lr)
            if step % 10 == 0 or step == cfg.trainer.sft_warmup_steps - 1:
                log.info("warm-up %d/%d: loss %.3f", step + 1, cfg.trainer.sft_warmup_steps, m.get("sft/loss", 0))
        self.policy.reset_optimizer_state()

    def sampling(self, step: int):
        """Sampling settings of a training step; the seed makes a resumed step draw the same samples."""
        from megaapo.rollout import SamplingSpec

        r = self.cfg.rollout
        return SamplingSpec.from_config(r, seed=(self.cfg.trainer.seed + 1) * 1_000_000_007 +
                                        step * r.prompts_per_step * r.n_samples)

    def evaluate(self, step: int) -> dict:
        """Held-out metrics: greedy generation scored by the reward code (rank 0), plus for SFT the held-out loss
        (every rank takes part; the last stage has the value)."""
        from megaapo.evaluate import evaluate

        row: dict = {}
        if not self.eval:
            return row
        if self.job == "sft":
            from megaapo.supervised import build_samples, heldout_loss

            if self._heldout is None:
                self._heldout = build_samples(self.eval, self.builder, self.tokenizer, self.pixels, self.policy,
                                              target=self.cfg.sft.target)
            row |= heldout_loss(self.policy, self._heldout)
            if self.generates:   # the engine must generate with the weights just trained
                self.weight_sync.send(self.policy.version)
        if not self.rank0 or self.engines is None:
            return row
        # k >= 1: between two of the producer's generate calls (the engines serve one request at a time)
        with self._producer.weight_update() if self._producer is not None else contextlib.nullcontext():
            res = evaluate(self.engines, self.eval, self.builder, self.scorer, self.cfg.reward,
                           max_new_tokens=self.cfg.rollout.max_new_tokens)
        if self.job == "sft":   # SFT's next steps are the learner's (RL's next step generates first)
            self.engines.sleep()
        shape = (f"format {100 * res.format:.1f}%" if res.format is not None
                 else f"answered {100 * res.answered:.1f}%")   # `direct`/`plain` have no format to report
        log.info("step %d: held-out accuracy %.1f%% (%s, %d prompts, %.1fs)", step, 100 * res.accuracy, shape, res.n,
                 res.seconds)
        return row | res.metrics()

    def throughput(self, samples) -> dict:
        """Trained tokens (prompt + response) per second of this step so far, and MFU where the peak is known."""
        from megaapo.metrics import device_peak_flops, flops_per_token, mfu

        tokens = sum(int(s.input_ids.shape[0]) for s in samples)
        rate = tokens / max(1e-9, time.perf_counter() - self._step_start)
        sh = self.policy.shape
        fpt = flops_per_token(hidden_size=sh.hidden_size, num_layers=sh.num_layers,
                              intermediate_size=sh.ffn_hidden_size, vocab_size=sh.vocab_size,
                              seq_len=tokens / max(1, len(samples)), num_heads=sh.num_heads, num_kv_heads=sh.num_kv_heads,
                              head_dim=sh.head_dim)
        peak = device_peak_flops(self.cfg.model.dtype) if torch.cuda.is_available() else None
        util = mfu(rate / max(1, dist.get_world_size()), fpt, peak)
        return {"perf/tokens": tokens, "perf/tokens_per_s": rate, **({"perf/mfu": util} if util is not None else {})}

    # ------------------------------------------------------------------ the producer (rank 0)
    def producer(self, generate, score):
        """Rank 0's producer of rollout batches (`megaapo.producer`) over the loop's generate and score; None on the
        other ranks (they receive each batch). A resumed run continues at the checkpoint's next batch and takes the
        prompts it recorded in flight again."""
        from megaapo.producer import Producer

        if not self.rank0:
            return None
        r, extra = self.cfg.rollout, self.state.extra.get("async", {})
        p = Producer(self.stream, lambda seq, idx, between: generate(self, seq, idx, between),
                     lambda idx, ro: score(self, idx, ro), k=r.max_staleness, drop=r.stale_batches == "drop",
                     first_seq=extra.get("next_batch", self.state.step), synced=self.state.step,
                     version=self.policy.version, prompts_per_step=r.prompts_per_step,
                     inflight=extra.get("inflight"), partial=r.partial)
        p.dropped, p.consumed = extra.get("dropped", 0), extra.get("consumed", 0)
        self._closers.append(p.close)   # before the engines shut down (closers run in reverse)
        self._producer = p
        self._timeline = (self.run_dir / "timeline.jsonl").open("a")
        self._closers.append(self._timeline.close)
        return p

    @contextmanager
    def between_generations(self, producer):
        """A weight sync: the producer's engines are between two generate calls while it runs."""
        if producer is None:
            yield
            return
        t0 = time.perf_counter()
        with producer.weight_update():   # waits for the engines' generate call in flight (not with partial rollouts)
            t1 = time.perf_counter()
            yield
        self._sync_wait = t1 - t0
        producer.timeline += [("learner", "wait", t0, t1, self.state.step),
                              ("learner", "sync", t1, time.perf_counter(), self.state.step),
                              ("engine", "load", t1, time.perf_counter(), self.state.step)]

    def weights_sent(self, producer, batch, version: int) -> None:
        """After the step's sync: the producer's staleness clock, and what a checkpoint records about the data (the
        position after the batch just trained; at k >= 1 also the batches in flight)."""
        self.position = batch.after
        if producer is not None:
            producer.synced_to(version, self.state.step)
            if producer.k:
                self.state.extra["async"] = producer.resume_state(batch)

    def producer_metrics(self, producer, step: int, batch, dropped_before: int, waited: float) -> dict:
        """Idle time of each side this step (k=0: the learner waits for the whole rollout), and at k >= 1 the
        batch's staleness and the drops. Also appends the step's busy intervals to timeline.jsonl."""
        if producer is None:
            return {}
        now, t0 = time.perf_counter(), self._step_start
        producer.timeline.append(("learner", "train", t0 + waited, now, step))   # (its sync drawn on top)
        busy = sum(max(0.0, min(b, now) - max(a, t0)) for who, _, a, b, _ in producer.timeline[-16:] if who == "engine")
        for who, what, a, b, seq in producer.timeline[self._timeline_done:]:
            rec = {"who": who, "what": what, "t0": a, "t1": b, "seq": seq}
            if what == "train":   # which batch and prompts this step trained (resume audits: none lost or repeated)
                rec |= {"step": step, "batch": batch.seq, "prompts": list(batch.idx), "synced": batch.synced}
            self._timeline.write(json.dumps(rec) + "\n")
        self._timeline.flush()
        self._timeline_done = len(producer.timeline)
        idle, self._sync_wait = waited + self._sync_wait, 0.0   # its batch, and the engines before its sync
        row = {"time/learner_idle": idle, "time/engine_idle": max(0.0, now - t0 - busy)}
        return row | (producer.metrics(step, batch, dropped_before) if producer.k else {})

    # ------------------------------------------------------------------ logging, checkpoints, signals
    @contextmanager
    def _progress(self, start: int, total: int):
        with self.metrics.progress(total, start, description=self.job.upper()):
            yield

    def progress(self, start: int, total: int):
        with self._progress(start, total):
            for step in range(start, total):
                self._step_start = time.perf_counter()
                yield step

    def end_step(self, step: int, row: dict) -> bool:
        """After a step's update: held-out eval when due, log, checkpoint when due. True when a stop signal came
        (SIGTERM/SIGUSR1): the step is saved and the loop should exit (a requeued job resumes after it)."""
        every, total = self.cfg.trainer.eval_every, self.cfg.trainer.total_steps
        if (every and step % every == 0) or (step == total and (every or self.job == "sft")):
            with self.metrics.timer("eval"):
                row = row | self.evaluate(step)
        self.log(step, row)
        self.checkpointer.poll()   # commits a background save that has finished
        if self.should_save(step):
            with self.metrics.timer("checkpoint"):
                self.save(step)
        if self.stop_requested():
            log.warning("stop signal: saved step %d, exiting for requeue", step)
            return True
        return False

    def log(self, step: int, row: dict) -> None:
        self.metrics.log(step, self._from_last_stage(row))

    def _from_last_stage(self, row: dict) -> dict:
        """Loss metrics exist on the last pipeline stage; rank 0 (first stage) logs them."""
        g = self.groups
        if g.pp_size == 1 or g.tp_rank != 0 or g.dp_rank != 0:
            return row
        if g.last_stage:
            dist.send_object_list([row], dst=dist.get_global_rank(g.pp, 0), group=g.pp)
            return row
        if g.first_stage:
            box = [None]
            dist.recv_object_list(box, src=dist.get_global_rank(g.pp, g.pp_size - 1), group=g.pp)
            return {**box[0], **row}
        return row

    def should_save(self, step: int) -> bool:
        every = self.cfg.checkpoint.every
        return bool(every and step % every == 0) or step == self.cfg.trainer.total_steps

    def save(self, step: int) -> None:
        """Start writing `step_N` (all ranks); it becomes visible once written. The previous save is waited for."""
        # The trained batches' position, not the producer's (at k >= 1 it has taken prompts ahead: in flight).
        self.state.data_position = self.position or self.stream.state()
        # The reference is the warmed-up policy, which no file on disk holds.
        state = self._checkpoint_state(with_ref=bool(self.cfg.trainer.sft_warmup_steps))
        meta = {"train_state": self.state.to_dict(), "contents": sorted(state)} if self.rank0 else None
        self.checkpointer.save(step, state, meta, hf_dir=self.policy.hf_dir)

    def stop_requested(self) -> bool:
        if self.stop is None or not self.stop.any_rank():
            return False
        if not self.should_save(self.state.step):   # else the loop has just saved this step
            self.save(self.state.step)
        self.checkpointer.wait()   # the job ends (requeue) only after the checkpoint is committed
        return True

    def finish(self) -> None:
        if self.cfg.checkpoint.export_hf:
            out = self.policy.export_hf(self.run_dir / "hf_final")
            log.info("final policy exported to %s", out)
        self.checkpointer.wait()   # the final checkpoint, written while the policy was exported
        png = self.metrics.finish()
        if self.rank0:
            self._print_outcome(png)

    def _print_outcome(self, png) -> None:
        """The run's question, answered in a line: did held-out accuracy rise during RL (what did SFT change)?"""
        from megaapo.metrics import read_jsonl

        rows = read_jsonl(self.metrics.jsonl_path)
        if self.job == "sft":
            self._print_sft_outcome(rows)
            if png:
                print(f"plot: {png}")
            return
        evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
        if len(evals) >= 2:
            (s0, a0), (s1, a1) = evals[0], evals[-1]
            print(f"held-out accuracy (greedy, {len(self.eval)} prompts): {100 * a0:.1f}% at step {s0} (start of RL)"
                  f" -> {100 * a1:.1f}% at step {s1} ({100 * (a1 - a0):+.1f} points); best {100 * max(a for _, a in evals):.1f}%")
        if png:
            print(f"plot: {png}")

    def _print_sft_outcome(self, rows: list) -> None:
        evals = [r for r in rows if "eval/loss" in r or "eval/accuracy" in r]
        if len(evals) < 2:
            return
        first, last = evals[0], evals[-1]
        what = {"r1vl": "StepRVR validity", "r1": "format"}.get(self.cfg.data.prompt_style, "format")
        parts = []
        for key, label, scale, unit in (("eval/loss", "held-out loss", 1, ""), ("eval/format", what, 100, "%"),
                                        ("eval/accuracy", "accuracy", 100, "%")):
            if key in first and key in last:
                parts.append(f"{label} {scale * first[key]:.3g}{unit} -> {scale * last[key]:.3g}{unit}")
        print(f"SFT, step {first['step']} -> {last['step']} ({len(self.eval)} held-out prompts, greedy): "
              + "; ".join(parts))
        if self.cfg.checkpoint.export_hf:
            print(f"start RL from it: megaapo train CONFIG model.path={self.run_dir / 'hf_final'}")

    def close(self, failed: bool = False) -> None:
        """Shut the parts down; a failing run stops a checkpoint still being written without committing it."""
        if self.checkpointer is not None:
            try:
                self.checkpointer.close(abort=failed)
            except Exception as e:   # closing must not hide the error that got us here
                log.warning("while finishing the last checkpoint: %s", e)
            self.checkpointer = None
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception as e:   # closing must not hide the error that got us here
                log.warning("while shutting down: %s", e)
        self._closers.clear()
        if getattr(self, "stop", None) is not None:
            self.stop.restore()


def plan_run(cfg):
    """This process's GPU placement (trainer ranks, the engines rank 0 starts), from the launcher's environment;
    logged by rank 0. Raises ConfigError for a layout that cannot work."""
    from megaapo.rollout.placement import plan_here

    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else \
        ("nccl" if torch.cuda.is_available() else "gloo")
    placement = plan_here(cfg.rollout, trainer_on_gpu=backend == "nccl")
    if int(os.environ.get("RANK", 0)) == 0:
        log.info("placement: %s", placement.describe())
    return placement


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
