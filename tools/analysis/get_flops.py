"""Backbone #params and GFLOPs of configs at 1333x800, in the papers' convention, beside the
papers' figures (MMPretrain classifier configs: the whole classifier at 224x224)."""
import argparse

import mmattn  # noqa: F401  (registers the blocks)
from mmattn.analysis import COUNTING_RULES, complexity_table, config_complexity
from mmattn.apis import exit_on_known_error


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('configs', nargs='+', metavar='CONFIG', help='config file(s)')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='input height and width (default 800 1333 for detectors, '
                        '224 224 for classifiers)')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with exit_on_known_error():
        rows = [config_complexity(config, args.shape) for config in args.configs]
    print(complexity_table(rows))
    print(f'\nCounted: {COUNTING_RULES}')
    papers = [row.paper for row in rows if row.paper is not None]
    if papers:
        print('Papers: ' + '; '.join(dict.fromkeys(paper.source for paper in papers)) + '.')
    for row in rows:
        if row.paper is not None and row.paper.note:
            print(f'{row.config} ({row.paper.model}): {row.paper.note}.')


if __name__ == '__main__':
    main()
