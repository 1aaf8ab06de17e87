"""Live-storage accounting for a traced step: what a CUDA caching allocator would count as allocated, by category.

`StorageTracker` is a dispatch mode placed above torch's `FakeTensorMode`: every tensor an op returns is looked at,
and each storage seen for the first time is charged, rounded up to the allocator's block (512 bytes for CUDA's
caching allocator; 1, exact, when comparing with the CPU allocator), to the category active at that moment
(`tracker.category("activations")`); a weak reference to the storage un-charges it when the last tensor using it
dies, exactly when the real allocator would free the block. The peak of the total, and the per-category split at
that peak, are what `max_memory_allocated` would report for the same program. Storages can be re-categorised later
(`recategorise`): megatron's DDP, for one, moves the weights into a buffer it allocates itself.

The tracker also keeps the traced program running where it reads values. Index bookkeeping runs for real: an op
whose tensor inputs are all real (the ids, image grids and masks a micro-batch carries) and a factory that makes an
integer or boolean tensor (positions, window indices), so shapes computed from them (image feature counts, vision
windows) are exact; such tensors are counted like any other. A value read from a fake tensor (`.item()` on a loss,
a norm or a metric) returns 0, which only ever feeds logs and clipping, never a shape.

Used by `megaapo.memory.trace`; nothing else.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

BLOCK = 512   # c10's CUDACachingAllocator rounds every request up to a multiple of 512 bytes


@dataclass
class Peak:
    total: int = 0
    by_category: dict = field(default_factory=dict)
    phase: str = ""


aten = torch.ops.aten
_DATA_DEPENDENT = {aten.nonzero.default, aten.index.Tensor, aten.masked_select.default}
_METADATA = {torch.ops.prim.device.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
             aten.sym_storage_offset.default, aten.is_contiguous.default, aten.is_contiguous.memory_format}


def _upper_bound(func, args, kwargs):
    """A boolean selection from fake data, answered as if every element were selected (its largest result): the
    metrics' `x[mask]` then cost what they can cost at most, which is little."""
    x = args[0]
    if func is aten.nonzero.default:
        return torch.empty(x.numel(), x.dim(), dtype=torch.long, device=x.device)
    if func is aten.masked_select.default:
        return torch.empty(torch.broadcast_shapes(x.shape, args[1].shape).numel(), dtype=x.dtype, device=x.device)
    indices = []
    for ix in args[1]:
        if ix is not None and ix.dtype == torch.bool:
            indices += [torch.zeros(ix.numel(), dtype=torch.long, device=ix.device)] * ix.dim()
        else:
            indices.append(ix)
    return func(x, indices)


def _no_communication(func, args):
    """A collective on fake tensors: its buffers are its arguments (already counted); it returns them and a done
    Work, as the fake process group does for real tensors."""
    from torch._C._distributed_c10d import FakeWork

    out = tuple(FakeWork().boxed() if "Work" in str(r.type) else args[0] for r in func._schema.returns)
    return out[0] if len(out) == 1 else out


def _is_index(t) -> bool:
    return isinstance(t, FakeTensor) and not (t.is_floating_point() or t.is_complex()) and t.numel() <= 1 << 24


class StorageTracker(TorchDispatchMode):
    """Counts live storages by category; `peak`, `phase_peaks`, `category_peaks` and `by_category` are the results
    (the caller sets `resident`, what is live between steps)."""

    def __init__(self, block: int = BLOCK) -> None:
        super().__init__()
        self.block = block
        self.resident: dict[str, int] = {}
        self._live: dict[int, tuple[int, str, weakref.ref]] = {}   # id(storage) -> (bytes, category, ref)
        self.by_category: dict[str, int] = {}
        self.category_peaks: dict[str, int] = {}   # each category's own largest total
        self.total = 0
        self.peak = Peak()
        self.phase_peaks: dict[str, int] = {}
        self._category = "other"
        self._phase = ""
        self.value_reads = 0      # .item() on fake tensors answered with 0
        self.bounded_shapes = 0   # boolean selections on fake tensors answered at their largest

    # ------------------------------------------------------------------ categories and phases
    @contextlib.contextmanager
    def category(self, name: str):
        prev, self._category = self._category, name
        try:
            yield
        finally:
            self._category = prev

    @contextlib.contextmanager
    def phase(self, name: str):
        """A named stretch of the program whose own peak is reported (e.g. 'train step')."""
        prev, self._phase = self._phase, name
        self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.total)
        try:
            yield
        finally:
            self._phase = prev

    def recategorise(self, tensors, name: str) -> None:
        """Charge the storages of these tensors to `name` from now on (and in the peak split, if live at it)."""
        for t in tensors:
            if t is None:
                continue
            key = id(t.untyped_storage())
            if key in self._live:
                nbytes, old, ref = self._live[key]
                if old != name:
                    self._add(old, -nbytes)
                    self._add(name, nbytes)
                    self._live[key] = (nbytes, name, ref)

    # ------------------------------------------------------------------ accounting
    def _add(self, name: str, nbytes: int) -> None:
        self.by_category[name] = self.by_category.get(name, 0) + nbytes

    def _charge(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._live:
            return
        nbytes = -(-st.nbytes() // self.block) * self.block
        if nbytes == 0:
            return
        live = self._live
        tracker = self

        def release(_ref, key=key):
            entry = live.pop(key, None)
            if entry is not None:
                tracker._add(entry[1], -entry[0])
                tracker.total -= entry[0]

        self._live[key] = (nbytes, self._category, weakref.ref(st, release))
        self._add(self._category, nbytes)
        if self.by_category[self._category] > self.category_peaks.get(self._category, 0):
            self.category_peaks[self._category] = self.by_category[self._category]
        self.total += nbytes
        if self.total > self.peak.total:
            self.peak = Peak(self.total, {k: v for k, v in self.by_category.items() if v}, self._phase)
        if self._phase and self.total > self.phase_peaks.get(self._phase, 0):
            self.phase_peaks[self._phase] = self.total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:   # asked thousands of times (tensor.device): nothing to count
            return func(*args, **kwargs)
        tensors: list = []
        _collect((args, kwargs), tensors)
        fake = any(isinstance(t, FakeTensor) for t in tensors)
        if func is aten._local_scalar_dense.default and fake:
            self.value_reads += 1
            return False if args[0].dtype == torch.bool else 0
        if func.namespace == "c10d" and fake:
            return _no_communication(func, args)
        if func in _DATA_DEPENDENT and fake:
            self.bounded_shapes += 1
            out = _upper_bound(func, args, kwargs)
        elif tensors and not fake:
            with unset_fake_temporarily():   # real in, real out: index bookkeeping keeps its values
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
            if not tensors and _is_index(out):   # a factory's integer/bool tensor: positions, windows, masks
                with unset_fake_temporarily():
                    out = func(*args, **kwargs)
        made: list = []
        _collect(out, made)
        for t in made:
            if t.device.type != "meta":
                self._charge(t)
        return out


def _collect(obj, out: list) -> None:
    """The tensors in an op's (nested) arguments or results."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _collect(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _collect(x, out)
