"""The RL loop's producer: prompts -> engines -> rewards, one batch per training step, either in the loop's own
thread (`rollout.max_staleness=0`, the synchronous loop) or on a thread that runs up to k batches ahead of the
learner (k >= 1). Built by `megaapo.run.Run.producer` on global rank 0 (the rank that drives the engines); the loop
in `megaapo.train` calls `next()` for each step's batch and `weight_update()` around each weight sync.

Staleness is counted in weight syncs (RL steps), the unit the bound is about: `synced` is how many steps the learner
had completed when the weights the engines serve were sent. A batch generated at `synced = v` and trained at step s
is `s - v` syncs behind. With `rollout.stale_batches=wait` the producer starts batch j only once `synced >= j - k`,
so no batch is ever more than k behind; with `drop` it never waits for weights (up to 2k finished batches queue up)
and the learner drops a batch more than k behind, counted (`async/dropped`, `async/dropped_share`).

Generation and weight updates never overlap: one lock is held around each generate call and each weight sync (the
engine server serves one request at a time; a sync between two generate calls is what makes every token of a batch
come from one version). With partial rollouts (`rollout.partial`) the lock is held only around each request of a
generation (submit, collect): a sync between two of them pauses the batch in place, and its tokens carry their
versions. Resume: each batch carries the prompt stream's state after its prompts were taken; the
checkpoint records the consumer's position and the in-flight prompts (`resume_state`), and a resumed producer takes
the same prompts again, in the same order, under the same sampling seeds (checked against the record).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("megaapo.train")


@dataclass
class Batch:
    seq: int                 # batch number in the run (the sampling seed's index; the step at k=0)
    idx: list                # prompt indices into the training set
    after: dict              # the prompt stream's state after these prompts were taken
    rollouts: list = None
    rewards: object = None
    synced: int = 0          # syncs the learner had completed when the served weights were sent
    token_synced: list = field(default_factory=list)   # per rollout: per token, the sync its weights came from
    seconds: float = 0.0     # generation time


class Producer:
    def __init__(self, stream, generate, score, *, k: int, drop: bool, first_seq: int, synced: int, version: int,
                 prompts_per_step: int, inflight: list | None = None, partial: bool = False):
        """generate(seq, idx, between) -> rollouts and score(idx, rollouts) -> rewards are the loop's
        (megaapo.train); `between` is the lock weight updates hold, given with partial rollouts (else None: the
        whole call runs under it)."""
        self.stream, self._generate, self._score = stream, generate, score
        self.k, self.drop, self.per_step, self.partial = k, drop, prompts_per_step, partial
        self.seq = first_seq                   # the next batch the producer makes
        self.synced = synced                   # syncs completed by the learner (the engines serve that one)
        self.version_sync = {version: synced}  # engine weight version -> the sync it came with
        self.recorded = list(inflight or [])   # in-flight prompts a checkpoint recorded: checked on regeneration
        self.lock = threading.Lock()           # generation xor weight update
        self.cv = threading.Condition()
        self.ready: queue.Queue = queue.Queue()
        self.pending: list[Batch] = []         # taken but not trained (queued, or being generated)
        self.dropped = self.consumed = 0
        self.timeline: list = []               # (who, what, t0, t1, seq) for the busy/idle plot
        self.error: BaseException | None = None
        self._stop = False
        self._thread = None
        if k:
            self._thread = threading.Thread(target=self._run, name="megaapo-producer", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ producer side
    def _take(self) -> Batch:
        idx = self.stream.take(self.per_step)
        if self.recorded:
            seq, want = self.recorded.pop(0)
            if seq != self.seq or list(want) != list(idx):
                raise RuntimeError(f"resume: batch {self.seq} took prompts {idx[:4]}..., but the checkpoint recorded "
                                   f"batch {seq} in flight with {list(want)[:4]}...: the data or its order changed")
        return Batch(self.seq, idx, self.stream.state())

    def _make(self) -> Batch:
        batch = self._take()
        with self.cv:
            self.pending.append(batch)
        t0 = time.perf_counter()
        if self.partial:   # the engines generate between our requests; a weight update may come mid-sequence
            batch.synced = self.synced
            batch.rollouts = self._generate(batch.seq, batch.idx, self.lock)
        else:
            with self.lock:
                batch.synced = self.synced
                t0 = time.perf_counter()
                batch.rollouts = self._generate(batch.seq, batch.idx, None)
        batch.seconds = time.perf_counter() - t0
        self.timeline.append(("engine", "generate", t0, t0 + batch.seconds, batch.seq))
        batch.token_synced = [self._token_syncs(r, batch.synced) for r in batch.rollouts]
        t1 = time.perf_counter()
        batch.rewards = self._score(batch.idx, batch.rollouts)
        self.timeline.append(("rewards", "score", t1, time.perf_counter(), batch.seq))
        self.seq += 1
        return batch

    def _token_syncs(self, rollout, synced: int) -> list:
        """Per token, the sync whose weights generated it (vLLM's per-token version spans; one span without partial
        rollouts)."""
        spans = rollout.weight_versions or [[rollout.weight_version, 0, len(rollout.token_ids)]]
        out = [synced] * len(rollout.token_ids)
        for version, lo, hi in spans:
            for t in range(lo, min(hi, len(out))):
                out[t] = self.version_sync.get(int(version), synced)
        return out

    def _may_start(self) -> bool:
        ahead = len(self.pending)
        if self.drop:
            return ahead < 2 * self.k + 1
        # wait: batch `seq` needs weights at most k syncs older than the step that trains it (step = seq when the
        # learner drops nothing), and at most k + 1 batches are taken but untrained (k queued, one in generation)
        return ahead <= self.k and self.synced >= self.seq - self.k

    def _run(self) -> None:
        try:
            while True:
                with self.cv:
                    self.cv.wait_for(lambda: self._stop or self._may_start())
                    if self._stop:
                        return
                self.ready.put(self._make())
        except BaseException as e:   # noqa: BLE001 - re-raised in the loop's thread by next()
            self.error = e
            self.ready.put(None)

    # ------------------------------------------------------------------ consumer side
    def next(self, step: int) -> tuple[Batch, float]:
        """The batch that trains step `step` and the seconds the learner waited for it. k=0: made now."""
        if not self.k:   # the learner waits for all of it
            t0 = time.perf_counter()
            batch = self._make()
            self.consumed += 1
            return batch, time.perf_counter() - t0
        t0 = time.perf_counter()
        while True:
            batch = self.ready.get()
            if batch is None:
                raise self.error
            with self.cv:
                self.pending.remove(batch)
                self.cv.notify_all()
            self.consumed += 1
            if step - batch.synced <= self.k:
                break
            self.dropped += 1   # drop mode: generated more than k syncs before this step
            log.info("dropped batch %d: generated %d syncs before step %d (rollout.max_staleness=%d)",
                     batch.seq, step - batch.synced, step, self.k)
        waited = time.perf_counter() - t0
        self.timeline.append(("learner", "wait", t0, t0 + waited, step))
        return batch, waited

    def weight_update(self):
        """Held around a weight sync: it happens between two generate calls, never inside one."""
        return self.lock

    def synced_to(self, version: int, synced: int) -> None:
        """After a sync: the engines serve `version`, sent after `synced` completed steps."""
        with self.cv:
            self.version_sync[version] = synced
            self.synced = synced
            self.cv.notify_all()

    def metrics(self, step: int, batch: Batch, dropped_before: int) -> dict:
        """Staleness of the batch trained at `step`, per token (in syncs), and the drops."""
        behind = [step - s for per in batch.token_synced for s in per] or [step - batch.synced]
        return {"async/versions_behind_mean": sum(behind) / len(behind), "async/versions_behind_max": max(behind),
                "async/dropped": self.dropped - dropped_before,
                "async/dropped_share": self.dropped / max(1, self.consumed)}

    def resume_state(self, batch: Batch) -> dict:
        """What a checkpoint after training `batch` records: the next batch's number and the prompts taken after
        it (in flight: queued or being generated), which a resumed run takes again in the same order."""
        with self.cv:
            inflight = [[b.seq, list(b.idx)] for b in self.pending]
        return {"next_batch": batch.seq + 1, "dropped": self.dropped, "consumed": self.consumed,
                "inflight": inflight}

    def close(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify_all()
        if self._thread is not None:
            # A generate call in flight finishes within the request deadline; the engines are shut down after us.
            self._thread.join(timeout=1.0)
