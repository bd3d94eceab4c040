"""Start mmattn's command-line tools as separate processes that a test can SIGKILL, quickly.

A fresh Python spends seconds importing torch, mmengine and mmdet before a tool does anything;
a test that kills and restarts training several times would spend most of its time there. The
processes here fork from one server that imported all of that once (multiprocessing's
``forkserver`` with preloaded modules); each is otherwise a normal run of ``tools/<name>.py``
(``sys.argv``, ``__main__``, exit code), with one CPU thread so timings do not depend on how busy
the machine is.
"""
from __future__ import annotations

import multiprocessing
import os
import pathlib
import runpy
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
_CONTEXT = multiprocessing.get_context('forkserver')
_CONTEXT.set_forkserver_preload(['torch', 'mmengine.runner', 'mmdet.models', 'mmdet.datasets',
                                 'mmdet.engine', 'mmdet.evaluation', 'mmattn', 'mmattn.apis'])


def _run(tool: str, args: list[str], env: dict[str, str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    os.chdir(ROOT)
    import torch
    torch.set_num_threads(1)
    sys.argv = [tool, *args]
    runpy.run_path(str(ROOT / tool), run_name='__main__')


class Tool:
    """One run of a tool; its stdout and stderr go to ``log``."""

    def __init__(self, tool: str, *args: str, log: pathlib.Path, env: dict | None = None) -> None:
        self.log = log
        self.process = _CONTEXT.Process(target=_run, args=(tool, list(args), env or {}, str(log)))
        self.process.start()

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ''

    def wait_for(self, text: str, timeout: float = 120) -> None:
        """Block until ``text`` is in the output (fail if the process ends or time runs out)."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if not self.process.is_alive() and text not in self.output():
                raise AssertionError(f'ended without printing {text!r}:\n{self.output()[-3000:]}')
            if time.monotonic() > deadline:
                raise AssertionError(f'{text!r} not printed in {timeout} s:\n'
                                     f'{self.output()[-3000:]}')
            time.sleep(0.02)

    def kill(self) -> None:
        self.process.kill()  # SIGKILL
        self.process.join()

    def wait_or_kill(self, timeout: float) -> int | None:
        """The exit code if the process ends within ``timeout`` s; else SIGKILL it, None."""
        self.process.join(timeout)
        if self.process.exitcode is not None:
            return self.process.exitcode
        self.kill()
        return None

    def wait(self, timeout: float = 120) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.kill()
            raise AssertionError(f'still running after {timeout} s:\n{self.output()[-3000:]}')
        return self.process.exitcode
