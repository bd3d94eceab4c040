"""A checkpoint carrying pickled code is refused with mmattn's message wherever mmattn loads one.

The payload would create a marker file; the tests check that it never does.
"""
import pathlib
import pickle
import re

import pytest
import torch
from conftest import TINY_CONFIG
from forked_tools import Tool

from mmattn.checkpoint.safe_load import CheckpointRefusedError, load_checkpoint_file


class Payload:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker, )


@pytest.fixture
def evil(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """A checkpoint that looks like mmengine's, and the file its payload would create."""
    marker = tmp_path / 'payload-ran'
    path = tmp_path / 'iter_4.pth'
    torch.save({'meta': {'epoch': 1, 'iter': 4, 'hook': Payload(marker)}, 'state_dict': {}}, path)
    return path, marker


def test_the_loader_refuses_with_the_file_and_the_global(evil):
    path, marker = evil
    with pytest.raises(CheckpointRefusedError) as refused:
        load_checkpoint_file(str(path))
    assert re.match(rf'refused: {re.escape(str(path))} contains pickled code \(pathlib\.\S+\); '
                    'mmattn loads checkpoints with weights_only=True', str(refused.value))
    assert isinstance(refused.value, pickle.UnpicklingError)
    assert not marker.exists()


def run_tool(tmp_path, *args: str) -> str:
    run = Tool(*args, log=tmp_path / f'{args[0].split("/")[-1]}.log')
    assert run.wait() == 1, run.output()[-3000:]
    return run.output()


def test_train_resume_refuses_a_replaced_checkpoint(evil, tiny_data, tmp_path):
    path, marker = evil
    (tmp_path / 'last_checkpoint').write_text(str(path))
    output = run_tool(tmp_path, 'tools/train.py', TINY_CONFIG, '--work-dir', str(tmp_path),
                      '--resume', '--cfg-options', f'data_root={tiny_data}/')
    assert f'error: refused: {path} contains pickled code (pathlib.' in output
    assert not marker.exists()


def test_train_load_from_refuses_it(evil, tiny_data, tmp_path):
    path, marker = evil
    output = run_tool(tmp_path, 'tools/train.py', TINY_CONFIG, '--work-dir', str(tmp_path / 'w'),
                      '--cfg-options', f'data_root={tiny_data}/', f'load_from={path}')
    assert f'error: refused: {path} contains pickled code' in output
    assert 'Epoch(train)' not in output
    assert not marker.exists()


def test_test_tool_refuses_it(evil, tiny_data, tmp_path):
    path, marker = evil
    output = run_tool(tmp_path, 'tools/test.py', TINY_CONFIG, str(path), '--work-dir',
                      str(tmp_path / 'w'), '--cfg-options', f'data_root={tiny_data}/')
    assert f'error: refused: {path} contains pickled code' in output
    assert not marker.exists()
