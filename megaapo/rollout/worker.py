"""megaapo's vLLM worker extension: checksums of the weights a weight update hands to the model's loader.

Mixed into every vLLM worker through `worker_extension_cls` (set by `megaapo.rollout.engine.VllmEngine`) and
called only through `LLM.collective_rpc("megaapo_...")`, so each method runs on every worker of the engine (one per
vLLM tensor-parallel rank). The transfer itself is vLLM's (`WeightTransferConfig`, see `megaapo.rollout.transfer`);
this only watches it: between `megaapo_watch_loads` and `megaapo_loaded_checksums` every (name, tensor) pair the
transfer engine passes to `model.load_weights` is checksummed (`buckets.checksum` of its bytes), whatever the
backend (gloo, vLLM's nccl or ipc). Every worker receives the full HF tensors and vLLM's loader keeps its shard,
so each worker's list must equal what the trainer sent.

Importing this module also registers megaapo's gloo backend with vLLM's factory: CPU workers of a TP > 1 engine are
spawned fresh and import the extension before vLLM builds their transfer engine.
"""

from __future__ import annotations

from megaapo.rollout import gloo
from megaapo.rollout.buckets import as_bytes, checksum

gloo.register()


class WeightChecksumExtension:
    """Methods added to vLLM's Worker class (`self` is the worker: `self.weight_transfer_engine`)."""

    def megaapo_watch_loads(self) -> None:
        """Checksum every tensor loaded from now until `megaapo_loaded_checksums`."""
        model = self.weight_transfer_engine.model    # the module the transfer engine loads into
        if "load_weights" in vars(model):   # already watching (an update that failed half-way): start again
            del model.load_weights
        original, sums = model.load_weights, []

        def load_weights(weights):
            def tap():
                for name, t in weights:
                    sums.append([name, checksum(as_bytes(t.detach().contiguous()))])
                    yield name, t
            return original(tap())

        model.load_weights = load_weights   # an instance attribute shadows the method until it is deleted
        self._megaapo_sums = sums

    def megaapo_loaded_checksums(self) -> list:
        """[[name, checksum], ...] in load order since `megaapo_watch_loads`; stops watching."""
        model = self.weight_transfer_engine.model
        if "load_weights" in vars(model):
            del model.load_weights
        sums, self._megaapo_sums = getattr(self, "_megaapo_sums", []), []
        return sums
