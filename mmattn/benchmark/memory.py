"""Training memory of one forward + backward step, measured on any device, CPU included.

Two numbers, both deterministic for a given model and input:

- ``saved_bytes``: the bytes autograd keeps for backward at the end of the forward pass (every
  tensor a backward function saves, seen through ``torch.autograd.graph.saved_tensors_hooks``,
  each storage counted once however many functions save it or views of it; parameters, buffers
  and the input left out). This is the activation memory a training step holds when its
  backward pass starts, the part an attention block adds to.
- ``peak_bytes``: the highest total of bytes allocated by PyTorch's allocator between the start
  of the forward pass and the end of the backward pass, read from the profiler's memory events
  (``torch.profiler`` with ``profile_memory=True``); it adds the temporaries of each op and the
  gradients to ``saved_bytes``. Parameters, buffers and the input, allocated before the step,
  are not counted (nor are gradients left from an earlier step: clear them first).
  The profiler's own messages on stderr (kineto's stage markers, its GPU probe failing on a
  CUDA build of torch without a GPU, c10's note on blocks allocated before the session) are
  dropped; anything else written to stderr meanwhile is passed on.
"""
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable

import torch
from torch.profiler import ProfilerActivity, profile

# Substrings of the lines a CPU profiler session writes to the process's stderr: kineto's stage
# markers, its GPU probe on a CUDA build of torch without a GPU, and c10's note that a block
# allocated before the session was freed during it (a free the events leave out, as they leave
# out that block's allocation).
PROFILER_CHATTER = ('SyncActivityProfilerHandler.cpp', 'gpuGetDeviceCount failed',
                    'allocated before the profiling started')


def saved_bytes(step: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves while ``step()`` runs its forward pass.

    ``step`` returns the loss; its backward pass is run afterwards (and frees the graph).
    Storages of ``exclude`` (the parameters, buffers and input, which exist anyway) are left out.
    """
    skip = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.layout == torch.strided:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in skip:
                storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = step()
    loss.backward()
    return sum(storages.values())


def peak_bytes(step: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Peak bytes allocated during ``step()`` and its backward on ``device``.

    On CUDA: the caching allocator's peak statistics. Elsewhere: the profiler's memory events.
    """
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step().backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with _without_profiler_chatter():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step().backward()
        fd, path = tempfile.mkstemp(suffix='.json')
        os.close(fd)
        try:
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)['traceEvents']
        finally:
            os.remove(path)
    # 'Total Allocated' is the profiler's running total, which carries over from earlier
    # sessions; measure from its value before this session's first allocation.
    events = [event['args'] for event in events if event.get('name') == '[memory]'
              and event['args'].get('Device Type', 0) == 0]
    if not events:
        return 0
    start = events[0]['Total Allocated'] - events[0]['Bytes']
    return max(event['Total Allocated'] for event in events) - start


@contextlib.contextmanager
def _without_profiler_chatter():
    """Hold file descriptor 2 in a temporary file meanwhile; then write back all but the
    profiler's chatter, in order."""
    sys.stderr.flush()
    stderr = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(stderr, 2)
            os.close(stderr)
            held.seek(0)
            lines = held.read().decode(errors='replace').splitlines(keepends=True)
            sys.stderr.write(''.join(line for line in lines
                                     if not any(part in line for part in PROFILER_CHATTER)))
            sys.stderr.flush()
