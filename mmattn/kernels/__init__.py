"""Fused CPU kernels: the passes over the feature map that eager PyTorch makes many of (SGE,
CBAM, and SE, ECA, CGD and GSoP with a frozen BN folded in), and the blocks' small gate functions
with their backward (see gates.h for why those pay), so that a block is a few calls.

The C++ sources beside this file are compiled on first use with torch's JIT extension builder
(ninja and a C++ compiler; about 30 s, once per machine: the build is cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) for the SIMD width torch
itself uses on this CPU. The ops are registered as ``torch.ops.mmattn.*``.

Each block keeps its eager path, with the same math, and takes it for tensors the kernels do not
cover (other devices, half precision, non-contiguous), when ``MMATTN_KERNELS=0`` is set, and when
the build fails (no compiler), which is warned about once.
"""
import functools
import os
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

SOURCE_DIR = Path(__file__).parent  # the .cpp files and the headers they include
SOURCES = tuple(sorted(SOURCE_DIR.glob('*.cpp')))
DTYPES = (torch.float32, torch.float64)

# What torch.backends.cpu.get_cpu_capability() reports -> the defines and flags that make ATen's
# Vectorized<T> use those instructions (as torch's own kernels for that capability do). Products
# and sums are not contracted into fused multiply-adds unless the source asks for one.
_CAPABILITY_FLAGS = {
    'AVX512': ['-DCPU_CAPABILITY=AVX512', '-DCPU_CAPABILITY_AVX512', '-mavx512f', '-mavx512bw',
               '-mavx512vl', '-mavx512dq', '-mfma'],
    'AVX2': ['-DCPU_CAPABILITY=AVX2', '-DCPU_CAPABILITY_AVX2', '-mavx2', '-mfma'],
}


def compiler_flags(capability: str) -> list[str]:
    """The C++ flags the kernels are built with for a CPU capability as
    ``torch.backends.cpu.get_cpu_capability()`` names it (other names, such as ``DEFAULT``:
    no SIMD flags, ATen's generic Vectorized)."""
    return ['-O3', '-fopenmp', '-ffp-contract=off', *_CAPABILITY_FLAGS.get(capability, [])]


def enabled() -> bool:
    """Whether the kernels are switched on (``MMATTN_KERNELS`` unset or not ``0``) and built."""
    return os.environ.get('MMATTN_KERNELS', '1') != '0' and _build()


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels take these tensors: :func:`plain_cpu_tensors`, and the kernels
    enabled. None entries are skipped."""
    return plain_cpu_tensors(*tensors) and enabled()


def plain_cpu_tensors(*tensors: torch.Tensor | None) -> bool:
    """Whether these tensors may take a CPU fast path: contiguous, on the CPU, all float32 or
    all float64. None entries are skipped.

    Never while torch.compile traces or a Python dispatch mode is active (fake tensors, the
    FLOP counter of ``mmattn.analysis.complexity``): those see the eager ops, which spell out
    the math.
    """
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    return (dtype in DTYPES
            and all(t.device.type == 'cpu' and t.dtype == dtype and t.is_contiguous()
                    for t in present)
            and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None)


@functools.cache
def _build() -> bool:
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        from torch.utils.cpp_extension import load
        load(name=f'mmattn_kernels_{capability.lower()}',
             sources=[str(source) for source in SOURCES],
             # -fopenmp: at::parallel_for is OpenMP inlined from torch's headers; the library
             # links the libgomp torch has already loaded.
             extra_cflags=compiler_flags(capability),
             extra_ldflags=['-fopenmp'],
             extra_include_paths=[str(SOURCE_DIR)],
             is_python_module=False)
    except Exception as error:  # a missing compiler or ninja: the eager path still works
        reason = f'{type(error).__name__}: {str(error).strip().splitlines()[0]}'
        warnings.warn(f'mmattn: the fused CPU kernels could not be built ({reason}); the blocks '
                      'use their slower eager PyTorch path. Install a C++ compiler and ninja, or '
                      'set MMATTN_KERNELS=0 to silence this.', stacklevel=3)
        return False
    return True
