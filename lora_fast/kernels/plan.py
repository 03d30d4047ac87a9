"""Launch sequences recorded once and replayed: the host path of a call that repeats an earlier call's metadata.

The launchers (kernels/ops.py) decide everything a launch needs (the GEMM path, the kernels, their grids, integer
arguments, constexprs and tile configs, the scratch buffers' shapes) from the tensors' metadata (shapes, strides,
dtypes, devices, 16-byte alignment of the data pointers), the LoRA scale and the dropout probability; the tensors'
values never enter a decision. So once a call with given metadata has run, the next call with the same metadata
issues the same launches, on the same compiled kernels, with only the tensors' data pointers (and the dropout seed
tensor) changed. ``Recorder`` watches one such call go through the launchers and keeps, per launch, the compiled
kernel, its resolved grid and its argument tuple with the tensors' positions marked; ``Replay`` then allocates the
same buffers and issues the same launches directly: no layout or path decision, no autotuner or launch-plan key, no
argument tuple built from names. A host-side tensor descriptor argument (the TMA GEMM with LORA_FAST_TMA_DESC=host,
kernels/descriptors.py) is recorded as its layout and its base tensor's role, never as the object: each replay
builds a fresh descriptor around its own call's tensor.

What a recording refuses (and the call keeps the launchers' path): a launch that tuned or compiled (the first call
of a kernel's key), a GEMM path not resolved yet (the measured choice times candidates), the interpreter (its
launches are not compiled kernels), a tensor argument that is neither an input nor a buffer the launchers allocated
(a copy made for alignment or strides, say), one tensor in two roles, launches on two streams or devices, a torch op
on the launchers' path that the recording does not know (``Recorder.addmm_`` records cuBLAS's GEMM). A replay
returns None, and the caller takes the launchers' path, when the current stream is not the recorded one or a
profiler's launch hook is installed (it wants launch metadata per launch).
"""

import threading
from typing import Optional

import torch
from triton import knobs
from triton.tools.tensor_descriptor import TensorDescriptor

from .descriptors import make as make_descriptor

_local = threading.local()
# calls being recorded in any thread: the launchers look for a recorder only while this is non-zero
RECORDING = [0]
# guards RECORDING's updates: ``RECORDING[0] += 1`` is a read and a write, and two threads' recordings could lose
# one (a thread switch between them on Python 3.9/3.10, or free-threaded Python); a count left at 0 during a
# recording would let the launchers skip recording launches, and the replay would silently leave them out
_RECORDING_LOCK = threading.Lock()


def recorder() -> Optional["Recorder"]:
    """The recorder of the current thread's call, or None."""
    return getattr(_local, "recorder", None) if RECORDING[0] else None


def can_record(device: torch.device) -> bool:
    """False while a CUDA graph is being captured on the current stream: a recording then would bind the capture
    stream and keep scratch from the graph's private memory pool, which the graph's replays write."""
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


class Recorder:
    """Watches one call through the launchers (``with Recorder(inputs) as rec: ...``) and becomes a ``Replay``
    (``rec.replay(outputs)``) when everything it saw can be replayed. ``inputs``: the tensors (or None) the replay
    will be given, in order."""

    def __init__(self, inputs):
        self.ok = True
        self._roles = {}          # id(tensor) -> index into the replay's tensor list
        self._tensors = []        # every tensor seen (kept alive, so that ids stay unique while recording)
        self._count = 0           # roles so far: the inputs, then the allocations
        self._constants = set()   # ids of buffers the launchers own (the reduction counters)
        self._views = {}          # id(alias) -> (shape, strides, view() gives it): what a torch op (``addmm_``)
        #                           must be given
        self.allocs = []          # the launchers' allocations, in order
        self.steps = []
        self.stream = self.device_index = self.stream_fn = None
        self.allocator = False    # a TMA kernel ran: the replay sets triton's allocator as the launchers do
        self.inputs = len(inputs)
        for t in inputs:
            self._role(t)

    def __enter__(self):
        if getattr(_local, "recorder", None) is not None:
            self.ok = False       # a recording inside another (an op calling an op): not supported, not needed
            self._outer = None
            return self
        self._outer = True
        _local.recorder = self
        with _RECORDING_LOCK:
            RECORDING[0] += 1
        return self

    def __exit__(self, *exc):
        if self._outer:
            _local.recorder = None
            with _RECORDING_LOCK:
                RECORDING[0] -= 1
        if exc[0] is not None:
            self.ok = False

    def fail(self) -> None:
        self.ok = False

    def _role(self, t) -> None:
        role = self._count
        self._count += 1
        if t is None:
            return
        self._tensors.append(t)
        if id(t) in self._roles:
            self.ok = False       # one tensor in two roles: a replay with two tensors could not tell them apart
        self._roles[id(t)] = role

    def alias(self, view: torch.Tensor, of: torch.Tensor) -> None:
        """``view`` stands in the role of ``of``: the same dtype and data pointer (the kernels read only the
        pointer; the integer arguments carry the view's strides, which the metadata fixes)."""
        if view is of:
            return
        if id(of) not in self._roles or view.dtype != of.dtype or view.data_ptr() != of.data_ptr():
            self.ok = False
            return
        self._roles[id(view)] = self._roles[id(of)]
        # whether ``of.view(shape)`` is this very view (same strides): a replay then calls view(), not as_strided()
        try:
            same = of.view(view.shape).stride() == view.stride() and view.storage_offset() == of.storage_offset()
        except RuntimeError:   # not viewable with that shape: as_strided
            same = False
        self._views[id(view)] = (tuple(view.shape), view.stride(), same)
        self._tensors.append(view)

    def alloc(self, t: torch.Tensor) -> torch.Tensor:
        """A buffer the launchers allocate (torch.empty): allocated again by each replay, unless it is small scratch
        (see ``Replay``)."""
        self.allocs.append(t)
        self._role(t)
        return t

    def constant(self, t: torch.Tensor) -> None:
        """A buffer the launchers keep across calls (the counters of kernels/ops.py, per device and stream)."""
        self._constants.add(id(t))
        self._tensors.append(t)

    def _slots(self, args):
        """(position, role, descriptor) of each tensor argument and of each host-side tensor descriptor (the TMA
        GEMM's, kernels/descriptors.py): descriptor is (shape, strides, block shape), rebuilt by each replay around
        the replay's tensor in its base's role (never this call's descriptor: it holds this call's tensor), else
        None."""
        slots = []
        for pos, a in enumerate(args):
            desc = None
            if isinstance(a, TensorDescriptor):
                desc = (list(a.shape), list(a.strides), list(a.block_shape))
                if a.padding != "zero" or getattr(a, "round_f32_to_tf32", False):   # (not in triton 3.6)
                    self.ok = False   # not what descriptors.make builds
                a = a.base
            if isinstance(a, torch.Tensor):
                role = self._roles.get(id(a))
                if role is None:
                    if id(a) not in self._constants or desc is not None:
                        self.ok = False
                    continue
                slots.append((pos, role, desc))
        return tuple(slots)

    def launch(self, compiled, grid, args, tail, index, stream_fn) -> None:
        """A launch of ``compiled`` (a triton CompiledKernel that has run) on ``grid`` (3 ints) with ``args`` (the
        kernel's explicit arguments) and ``tail`` (its config values), on device ``index``'s current stream."""
        stream = stream_fn(index)
        if self.stream_fn is None:
            self.stream, self.device_index, self.stream_fn = stream, index, stream_fn
        elif (stream, index) != (self.stream, self.device_index):
            self.ok = False
        slots = self._slots(args)
        template = list(args) + list(tail)
        for pos, _, _ in slots:
            template[pos] = None   # filled per replay; no reference to this call's tensors is kept
        self.steps.append((compiled.run, grid[0], grid[1], grid[2], compiled.function, compiled.packed_metadata,
                           template, slots))

    def addmm_(self, out, P, Q, q_shape, q_strides) -> None:
        """cuBLAS's ``out.addmm_(P, Q viewed as q_shape / q_strides)`` on the launchers' path (the "cublas" GEMM
        path), replayed as that one method call on the replay's tensors. Unlike a kernel, a torch op reads shapes
        and strides: an alias (the launchers' 2-D view of an N-D input) is rebuilt from the replay's tensor in
        that role (same metadata, so the view is the same), and a view that is the tensor's own layout (Q as
        stored) or its transpose is written as the tensor or ``.t()``, the least a view can cost."""
        slots = self._slots((out, P, Q))
        if len(slots) != 3:
            self.ok = False
            return
        views = [self._views.get(id(out)), self._views.get(id(P))]
        q_view = (tuple(q_shape), tuple(q_strides), False)
        if q_view[:2] == (tuple(Q.shape), Q.stride()):
            q_view = None
        elif Q.dim() == 2 and q_view[:2] == (tuple(Q.shape)[::-1], Q.stride()[::-1]):
            q_view = "t"
        self.steps.append((None, "addmm_", tuple(role for _, role, _ in slots), (*views, q_view)))

    def replay(self, outputs) -> Optional["Replay"]:
        """The replay of what was recorded, returning the tensors in the roles of ``outputs`` (None stays None),
        or None when the call cannot be replayed."""
        if not self.ok or self.stream_fn is None:
            return None
        roles = []
        for t in outputs:
            if t is None:
                roles.append(None)
            elif id(t) in self._roles:
                roles.append(self._roles[id(t)])
            else:
                return None
        return Replay(self, tuple(roles))


# Scratch (a buffer the launchers allocate that is not an output: split sums, dB partials, dS) of at most this many
# bytes is allocated once per replay and reused by its later calls from the recording thread: the launches of two
# calls on one stream run in stream order, so a call's kernels are done with it before the next call's write it.
# Another thread (which could interleave its launches with this one's on the same stream) allocates its own. The
# bound keeps what a replay holds small (a few of them per layer shape), where allocation is a visible share of the
# host time; larger scratch goes back to the caching allocator after each call. All replays together hold at most
# SCRATCH_BUDGET bytes (a run whose batches change shape every step makes a plan per shape): beyond it, replays
# allocate their scratch per call as the launchers do.
SCRATCH_BYTES = 1 << 20
SCRATCH_BUDGET = 64 << 20
_scratch_held = [0]


class Replay:
    """A recorded call's launches (see the module docstring). ``replay(*inputs)`` returns the output tensors, or None
    when this call cannot be replayed (another stream, a launch hook): then nothing was launched or allocated.

    The launches are written out as one Python function (``_source``), compiled once: each launch a call of the
    compiled kernel's launcher with its grid as literals, the call's tensors as local names and every other argument
    as a name bound to its recorded value. That is the least a Python launch can do per call (no argument tuple to
    copy and fill, no loop over steps): ~2 us less per replay than the same steps interpreted from tuples."""

    __slots__ = ("stream", "device_index", "stream_fn", "allocator", "owner", "capturing", "_run", "_source")

    def __init__(self, rec: Recorder, outputs):
        self.stream, self.device_index, self.stream_fn = rec.stream, rec.device_index, rec.stream_fn
        self.allocator = rec.allocator
        self.owner = threading.get_ident()
        # the held scratch is not used inside a CUDA graph capture: the graph would keep writing it on its replays,
        # on whatever stream they run, beside this replay's eager calls and other graphs captured from it; a
        # capture allocates afresh (from the graph's pool)
        self.capturing = torch.cuda.is_current_stream_capturing if torch.cuda.is_available() else None
        names = {"empty": torch.empty, "descriptor": make_descriptor}
        params = [f"t{i}" for i in range(rec.inputs)]
        lines = [f"def replay({', '.join(params + ['stream', 'enter_hook', 'exit_hook', 'own'])}):"]
        keep = set(outputs)
        templates = {}   # (dtype, device) -> the name of an empty tensor of that kind
        for j, t in enumerate(rec.allocs):
            role = rec.inputs + j
            kind = (t.dtype, t.device)
            if kind not in templates:
                templates[kind] = f"like{len(templates)}"
                names[templates[kind]] = torch.empty(0, dtype=t.dtype, device=t.device)
            # the template's new_empty with the shape as literal ints: torch.empty(shape, dtype=, device=) parses
            # a tuple and two keywords, ~1.7x the host instructions (callgrind)
            fresh = f"{templates[kind]}.new_empty({', '.join(str(int(d)) for d in t.shape)})" if t.dim() else \
                f"{templates[kind]}.new_empty(())"
            if not t.is_contiguous():   # a gradient in its input's layout (ops._empty_like): the same strides
                fresh = f"{templates[kind]}.new_empty_strided({tuple(t.shape)}, {t.stride()})"
            size = t.numel() * t.element_size()
            if role not in keep and size <= SCRATCH_BYTES and _scratch_held[0] + size <= SCRATCH_BUDGET:
                _scratch_held[0] += size
                names[f"scratch{j}"] = t
                lines.append(f"    t{role} = scratch{j} if own else {fresh}")
            else:
                lines.append(f"    t{role} = {fresh}")
        for i, step in enumerate(rec.steps):
            if step[0] is None:   # cuBLAS's addmm_ (Recorder.addmm_), a method call: a stand-in can patch it
                args = []
                for k, (role, view) in enumerate(zip(step[2], step[3])):
                    if view is None:
                        args.append(f"t{role}")
                    elif view == "t":
                        args.append(f"t{role}.t()")
                    elif view[2]:   # what view() of the tensor in that role gives: the cheaper call, ints literal
                        args.append(f"t{role}.view({', '.join(str(int(d)) for d in view[0])})")
                    else:
                        names[f"view{i}_{k}"] = view[:2]
                        args.append(f"t{role}.as_strided(*view{i}_{k})")
                lines.append(f"    {args[0]}.addmm_({args[1]}, {args[2]})")
                continue
            run, g0, g1, g2, function, packed, template, slots = step
            names[f"run{i}"], names[f"function{i}"], names[f"packed{i}"] = run, function, packed
            tensor_at = {pos: (role, desc) for pos, role, desc in slots}
            args = []
            for pos, value in enumerate(template):
                if pos in tensor_at:
                    role, desc = tensor_at[pos]
                    if desc is None:
                        args.append(f"t{role}")
                    else:   # a host descriptor of this replay's tensor, its layout fixed by the recording
                        for part, v in zip(("shape", "strides", "block"), desc):
                            names[f"d{part}{i}_{pos}"] = v
                        args.append(f"descriptor(t{role}, dshape{i}_{pos}, dstrides{i}_{pos}, dblock{i}_{pos})")
                else:
                    names[f"arg{i}_{pos}"] = value
                    args.append(f"arg{i}_{pos}")
            lines.append(f"    run{i}({int(g0)}, {int(g1)}, {int(g2)}, stream, function{i}, packed{i}, None, "
                         f"enter_hook, exit_hook, {', '.join(args)})")
        lines.append(f"    return ({''.join(('None' if role is None else f't{role}') + ', ' for role in outputs)})")
        self._source = "\n".join(lines)
        exec(compile(self._source, "<lora_fast.kernels.plan replay>", "exec"), names)
        self._run = names["replay"]

    def __call__(self, *inputs):
        index = self.device_index
        runtime = knobs.runtime
        enter_hook, exit_hook = runtime.launch_enter_hook, runtime.launch_exit_hook
        if enter_hook is not None and getattr(enter_hook, "calls", True):
            return None   # a profiler's hook wants launch metadata: the launchers' path provides it
        previous = torch.cuda.current_device()
        if previous != index:
            torch.cuda.set_device(index)
        try:
            if self.stream_fn(index) != self.stream:
                return None
            if self.allocator:
                from .ops import _ensure_allocator
                _ensure_allocator()
            own = threading.get_ident() == self.owner and not (self.capturing is not None and self.capturing())
            return self._run(*inputs, self.stream, enter_hook, exit_hook, own)
        finally:
            if previous != index:
                torch.cuda.set_device(previous)


# lora_fast.functional's planned calls (key -> _OpPlan), kept here so that choice.clear() can forget them
PLANS = {}


def clear() -> None:
    """Forget every planned call (their launches follow choices that choice.clear() forgets) and the scratch their
    replays hold (once the calls that still hold a replay for their backward are done)."""
    PLANS.clear()
    _scratch_held[0] = 0
