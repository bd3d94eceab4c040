"""The main job's whole path: data, two trainings, evaluation, one table (shortened to 1 epoch)."""
import pathlib

from mmattn.apis.demo import DEMO_RUNS, run_demo

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'demo'


def test_demo_trains_both_detectors_and_tabulates_them(tmp_path):
    # The demo configs, one epoch each: what the demo prints is what this exercises.
    for _, name in DEMO_RUNS:
        (tmp_path / name).write_text(
            f"_base_ = '{CONFIGS / name}'\n"
            'train_cfg = dict(max_epochs=1, val_interval=1)\n'
            "model = dict(test_cfg=dict(score_thr=0.0))\n")
    table = run_demo(str(tmp_path), str(tmp_path / 'data') + '/', str(tmp_path / 'work'))
    lines = table.splitlines()
    assert lines[0].startswith('| backbone | AP | AP50 | AP75 | AP_S | AP_M | AP_L | params (M) |')
    assert [line.split(' | ')[0] for line in lines[2:]] == [f'| {name}' for name, _ in DEMO_RUNS]
    # Backbone size at the demo width (base_channels=16): 1.48M; SGE adds 2 parameters per group
    # (512 in all), invisible at this precision, as in the paper (23.51M both).
    params = [line.split(' | ')[7] for line in lines[2:]]
    assert params == ['1.481', '1.481']
    for _, name in DEMO_RUNS:
        assert (tmp_path / 'work' / name[:-3] / 'epoch_1.pth').is_file()
