"""Evaluate a checkpoint; prints COCO box AP, AP50, AP75, AP_S, AP_M, AP_L (or the metrics)."""
import argparse

from mmengine.dist import is_main_process

import mmattn  # noqa: F401  (registers the blocks, makes checkpoints load safely)
from mmattn.apis import add_launch_arguments, exit_on_known_error, parse_launch_arguments, test
from mmattn.evaluation import metrics_table


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where the evaluation logs go')
    parser.add_argument('--out', help='dump the raw detections to this .pkl file')
    parser.add_argument('--show-dir', help='save drawn predictions under work_dir/<time>/SHOW_DIR')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation')
    add_launch_arguments(parser, 'data_root=/data/coco/')
    return parse_launch_arguments(parser)


def main() -> None:
    args = parse_args()
    with exit_on_known_error():
        metrics = test(args.config, args.checkpoint, work_dir=args.work_dir, out=args.out,
                       show_dir=args.show_dir, tta=args.tta, cfg_options=args.cfg_options,
                       launcher=args.launcher)
        if is_main_process():
            print(metrics_table(metrics, args.checkpoint))


if __name__ == '__main__':
    main()
