"""The kernels' sources compile for the SIMD widths this CPU does not build.

A machine builds the kernels for its own width only (AVX2 on AMD EPYC, AVX512 on a recent Xeon,
ATen's generic vectors on Arm), and vec_loops.h takes a different branch for AVX2 than for the
others, so a machine's own build and tests never see the other branch. This compiles every
source with each other width's flags, as mmattn.kernels builds them, to the syntax check
(templates instantiated, no code generated): it catches an error in a branch this machine does
not run, not a wrong result there.
"""
import shutil
import subprocess
import sysconfig

import pytest
import torch
from torch.utils.cpp_extension import include_paths

from mmattn import kernels

WIDTHS = ('AVX512', 'AVX2', 'DEFAULT')
COMPILER = shutil.which('c++')


def test_each_width_that_torch_names_has_flags_or_is_the_generic_build():
    assert {'-DCPU_CAPABILITY_AVX512', '-mavx512f', '-mavx512bw', '-mavx512vl',
            '-mavx512dq'} <= set(kernels.compiler_flags('AVX512'))
    assert '-mavx2' in kernels.compiler_flags('AVX2')
    assert not any(flag.startswith(('-m', '-DCPU_CAPABILITY'))
                   for flag in kernels.compiler_flags('DEFAULT'))


@pytest.mark.skipif(COMPILER is None, reason='no C++ compiler')
@pytest.mark.parametrize('width', [w for w in WIDTHS
                                   if w != torch.backends.cpu.get_cpu_capability()])
def test_the_sources_compile_for_another_simd_width(width):
    includes = [*include_paths(), sysconfig.get_paths()['include'], str(kernels.SOURCE_DIR)]
    command = [COMPILER, '-std=c++20', '-fsyntax-only', '-w', *kernels.compiler_flags(width),
               *(f'-I{path}' for path in includes)]
    jobs = {source.name: subprocess.Popen([*command, str(source)], stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True)
            for source in kernels.SOURCES}
    failed = {}
    for name, job in jobs.items():
        output, _ = job.communicate(timeout=600)
        if job.returncode:
            failed[name] = output[-3000:]
    assert not failed, f'{width}: ' + '\n'.join(f'{n}:\n{out}' for n, out in failed.items())
