"""The main job: train and evaluate a baseline and an SGE RetinaNet on the embedded data."""
import argparse

import mmattn  # noqa: F401  (registers the blocks, makes checkpoints load safely)
from mmattn.apis import exit_on_known_error
from mmattn.apis.demo import run_demo


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--config-dir', default='configs/demo', help='folder of the demo configs')
    parser.add_argument('--data-root', default='data/synthetic/',
                        help='where the synthetic data is written')
    parser.add_argument('--work-dir', default='work_dirs/demo', help='logs and checkpoints')
    parser.add_argument('--seed', type=int, default=0, help='seeds the data and the training')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with exit_on_known_error():
        table = run_demo(args.config_dir, args.data_root, args.work_dir, args.seed)
        print('\nRetinaNet on synthetic COCO-format data (val split), measured by this run:\n')
        print(table)


if __name__ == '__main__':
    main()
