"""Compare the COCO box AP of runs: ours, the gain over a baseline, the paper's number and the
paper's gain, as a markdown table and a bar chart of the AP_S / AP_M / AP_L gains.

RESULT is a work dir (its newest evaluation: validation during training or tools/test.py), a
<timestamp>/ run dir, one of MMEngine's JSON logs, or a plain metrics JSON; LABEL=RESULT names it
(by default it is named after the config MMEngine dumped into the work dir)."""
import argparse
import os.path as osp
import sys
from pathlib import Path

from mmattn.analysis import (
    ResultError,
    compare,
    comparison_table,
    load_metafile,
    plot_gains,
    read_result,
)

DEFAULT_METAFILE = Path(__file__).resolve().parents[2] / 'configs' / 'metafile.yml'


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('results', nargs='+', metavar='RESULT', help='[LABEL=]work dir or JSON')
    parser.add_argument('--baseline', metavar='NAME',
                        help="the result the gains are measured from (default: the first)")
    parser.add_argument('--out-png', metavar='PATH', help='save the bar chart of the gains here')
    parser.add_argument('--metafile', default=str(DEFAULT_METAFILE),
                        help="the papers' numbers (OpenMMLab metafile; default %(default)s)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    try:
        results = []
        for arg in args.results:
            label, sep, path = arg.partition('=')
            if not sep or osp.exists(arg):
                label, path = None, arg
            results.append(read_result(path, label))
        papers = {}
        if osp.isfile(args.metafile):
            papers = load_metafile(args.metafile)
        else:
            print(f"No metafile at {args.metafile}: the paper's columns show '-'.\n")
        comparison = compare(results, args.baseline, papers)
        print(comparison_table(comparison))
        print()
        for row in comparison.rows:
            print(f'{row.name}: {row.source}')
        if args.out_png:
            plot_gains(comparison, args.out_png)
            print(f'\nChart of the AP_S / AP_M / AP_L gains: {args.out_png}')
    except ResultError as err:
        sys.exit(f'error: {err}')


if __name__ == '__main__':
    main()
