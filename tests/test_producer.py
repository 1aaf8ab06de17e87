"""The producer's bound, drops and resume record (`megaapo.producer`), driven the way the RL loop drives it: a consumer
that trains (sleeps) and syncs after each step. generate/score are plain functions that record what the producer
gave them; the engines themselves are in tests/test_async.py."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from megaapo.data.stream import PromptStream
from megaapo.producer import Producer


def _producer(k: int, drop: bool, *, gen_s: float = 0.0, first_seq: int = 0, synced: int = 0, inflight=None,
              stream=None):
    seen = []
    served = {"version": 100 + synced}   # engine weight versions are not sync counts: 100 + sync

    def generate(seq, idx, between):
        seen.append((seq, list(idx)))
        time.sleep(gen_s)
        return [SimpleNamespace(token_ids=[1, 2, 3], weight_version=served["version"], weight_versions=[])]

    stream = stream or PromptStream(40, seed=1)
    p = Producer(stream, generate, lambda idx, ro: SimpleNamespace(timeouts=0), k=k, drop=drop, first_seq=first_seq,
                 synced=synced, version=100 + synced, prompts_per_step=2, inflight=inflight)
    return p, seen, served


def _consume(p, served, steps: int, first: int = 0, train_s: float = 0.0):
    out = []
    for step in range(first, first + steps):
        before = p.dropped
        batch, _ = p.next(step)
        out.append((step, batch, p.metrics(step, batch, before)))
        time.sleep(train_s)
        with p.weight_update():
            served["version"] = 100 + step + 1
        p.synced_to(100 + step + 1, step + 1)
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_wait_mode_never_trains_a_batch_more_than_k_syncs_old(k):
    p, seen, served = _producer(k, drop=False, gen_s=0.01)
    try:
        got = _consume(p, served, 8, train_s=0.03)
    finally:
        p.close()
    behind = [m["async/versions_behind_max"] for _, _, m in got]
    assert max(behind) <= k
    assert max(behind) == k          # the producer did run ahead (a slow learner: every batch as stale as allowed)
    assert [b.seq for _, b, _ in got] == list(range(8))
    # per-token versions come from the engine's weight versions, mapped to syncs
    assert all(m["async/versions_behind_mean"] == step - b.synced for step, b, m in got)
    assert p.dropped == 0


def test_drop_mode_drops_over_stale_batches_and_counts_them():
    p, seen, served = _producer(1, drop=True, gen_s=0.0)
    try:
        got = _consume(p, served, 5, train_s=0.05)
    finally:
        p.close()
    assert all(m["async/versions_behind_max"] <= 1 for _, _, m in got)
    assert p.dropped > 0
    assert sum(m["async/dropped"] for _, _, m in got) == p.dropped
    assert got[-1][2]["async/dropped_share"] == pytest.approx(p.dropped / p.consumed)
    # the prompts of trained and dropped batches together are the stream's order: nothing taken twice
    trained = [i for _, b, _ in got for i in b.idx]
    assert len(set(trained)) == len(trained)


def test_k0_makes_the_batch_in_the_callers_thread():
    p, seen, served = _producer(0, drop=False)
    batch, waited = p.next(0)
    assert seen == [(0, batch.idx)] and p._thread is None and waited >= 0


def test_resume_takes_the_recorded_inflight_prompts_again():
    stream = PromptStream(40, seed=1)
    p, seen, served = _producer(1, drop=False)
    try:
        got = _consume(p, served, 3, train_s=0.02)
        record = p.resume_state(got[-1][1])
        position = got[-1][1].after
    finally:
        p.close()
    assert record["next_batch"] == 3 and record["inflight"], record
    # a new producer from the checkpoint's position regenerates exactly the in-flight batches, in order
    stream.load(position)
    q, seen2, served2 = _producer(1, drop=False, first_seq=3, synced=3, inflight=record["inflight"], stream=stream)
    try:
        again = _consume(q, served2, 3, first=3)
    finally:
        q.close()
    assert [[b.seq, b.idx] for _, b, _ in again][:len(record["inflight"])] == record["inflight"]
    order = PromptStream(40, seed=1).take(12)
    assert [i for _, b, _ in got + again for i in b.idx] == order   # none lost, none repeated


def test_resume_refuses_a_changed_data_order():
    stream = PromptStream(40, seed=2)   # not the order the record was taken from
    p, _, served = _producer(1, drop=False, first_seq=3, synced=3, inflight=[[3, [0, 1]]], stream=stream)
    try:
        with pytest.raises(RuntimeError, match="checkpoint recorded batch 3 in flight"):
            p.next(3)
    finally:
        p.close()


def test_stale_token_gap_splits_each_sequence_by_the_version_of_each_token():
    from megaapo.algos.mismatch import stale_token_gap

    old = [[-1.0, -2.0, -3.0], [-1.0, -1.0]]
    behaviour = [[-1.0, -2.5, -2.0], [-1.5, -1.0]]
    behind = [[1, 0, 0], [0, 0]]   # the first response: its first token from the weights one sync old, the rest
    # from the current ones (a partial rollout continued after an update)
    got = stale_token_gap(old, behaviour, behind)
    assert got["logp_gap_fresh"] == pytest.approx((0.5 + 1.0 + 0.5 + 0.0) / 4)
    assert got["logp_gap_stale"] == pytest.approx(0.0)
    assert got["mixed_version_samples"] == 0.5


def test_decoupled_loss_weights_each_token_by_its_own_behaviour_logprob():
    """A partial rollout: the first two tokens came from the old weights (behaviour log-probs far from pi_old), the
    last two from the new ones. The loss's gradient per token is -A * pi_old/pi_behaviour / tokens (ratio 1 at
    pi = pi_old), so each token's gradient follows its own behaviour log-prob (decoupled PPO, untruncated)."""
    import math

    import torch

    from megaapo.algos.losses import LossSettings
    from megaapo.config import load_config
    from megaapo.experience import RLLoss
    from megaapo.train import behaviour_cap

    old = torch.tensor([-1.0, -2.0, -1.5, -0.5])
    behaviour = torch.tensor([-1.3, -1.8, -1.5, -0.5])
    exp = SimpleNamespace(lengths=torch.tensor([4.0]), keep=torch.tensor([True]), advantages=torch.tensor([2.0]),
                          kl_weight=torch.ones(1), rollout_logp=[behaviour])
    r = load_config("grpo", ["rollout.max_staleness=1"]).rollout
    loss_fn = RLLoss(exp, [0], LossSettings(), [old], None, behaviour_cap(r))
    logp = old.clone().unsqueeze(0).requires_grad_(True)
    loss, _ = loss_fn(logp, None, torch.ones(1, 4, dtype=torch.bool), [0])
    loss.backward()
    want = [-2.0 * math.exp(o - b) / 4 for o, b in zip(old.tolist(), behaviour.tolist())]
    assert logp.grad[0].tolist() == pytest.approx(want, rel=1e-6)
    assert behaviour_cap(load_config("grpo", ["rollout.max_staleness=1", "rollout.off_policy=tis"]).rollout) == 2.0
    assert behaviour_cap(load_config("grpo").rollout) == 0.0   # k=0: TIS as configured (off)


def test_proximal_update_takes_each_updates_own_logprobs_without_an_extra_pass():
    """rollout.proximal=update: no forward pass for pi_old (the policy is never asked), and each token's gradient is
    -A * pi/pi_behaviour / tokens at the current log-probs pi, whatever they are (the clipped ratio is 1)."""
    import math

    import torch

    from megaapo.algos.losses import LossSettings
    from megaapo.config import load_config
    from megaapo.experience import RLLoss
    from megaapo.train import behaviour_cap, old_logprobs

    class NoPass:
        def logprobs(self, *a, **kw):
            raise AssertionError("rollout.proximal=update must not compute pi_old with a forward pass")

    behaviour = torch.tensor([-1.3, -1.8, -1.5, -0.5])
    exp = SimpleNamespace(lengths=torch.tensor([4.0]), keep=torch.tensor([True]), advantages=torch.tensor([2.0]),
                          kl_weight=torch.ones(1), rollout_logp=[behaviour])
    cfg = load_config("grpo", ["rollout.max_staleness=1", "rollout.proximal=update"])
    assert old_logprobs(cfg, NoPass(), exp, []) is None
    with pytest.raises(AssertionError, match="must not"):   # the default recomputes pi_old
        old_logprobs(load_config("grpo", ["rollout.max_staleness=1"]), NoPass(), exp, [])
    current = torch.tensor([-0.9, -2.2, -1.4, -0.6])
    loss_fn = RLLoss(exp, [0], LossSettings(), None, None, behaviour_cap(cfg.rollout))
    logp = current.clone().unsqueeze(0).requires_grad_(True)
    loss, metrics = loss_fn(logp, None, torch.ones(1, 4, dtype=torch.bool), [0])
    loss.backward()
    want = [-2.0 * math.exp(c - b) / 4 for c, b in zip(current.tolist(), behaviour.tolist())]
    assert logp.grad[0].tolist() == pytest.approx(want, rel=1e-6)
    assert metrics["clip_frac"] == 0.0
