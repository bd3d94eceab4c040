"""Speed of each attention block at its paper placement against the plain ResNet backbone.

Builds the plain backbone, every mmattn block and every block's reference implementation in one
process, times them in interleaved rounds (inference batch 8 at 224x224, training forward +
backward batch 4 at 224x224, detection size 1x3x800x1333; by default on CUDA, and when named
on the CPU, also AMP and channels_last), measures the training step's memory, prints a markdown
table with the median ratio to the plain backbone and its spread, and writes everything to a
JSON file.
"""
import argparse
import json
import sys

import mmattn  # noqa: F401  (registers the blocks)
from mmattn.benchmark import BLOCKS, all_settings, markdown, merge, run


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--depths', type=int, nargs='+', default=[50, 101],
                        help='ResNet depths (default: 50 101)')
    parser.add_argument('--blocks', nargs='+', choices=list(BLOCKS),
                        help='blocks to measure (default: all)')
    parser.add_argument('--settings', nargs='+',
                        help=f'{", ".join(s.name for s in all_settings())} (default: all on '
                        'CUDA, the first three elsewhere; AMP is fp16 on CUDA, bf16 on the CPU)')
    parser.add_argument('--rounds', type=int, default=7, help='interleaved rounds (default 7)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed calls per model first')
    parser.add_argument('--repeat', type=int, default=3,
                        help='back-to-back calls per timed call, the fastest counts (default 3)')
    parser.add_argument('--default-malloc', action='store_true',
                        help="leave glibc's malloc as it is (it returns freed memory to the OS, "
                        'so feature maps are page-faulted in again on every pass)')
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:i] (default cpu)')
    parser.add_argument('--no-memory', action='store_true', help='skip the memory measurement')
    parser.add_argument('--image', type=int, default=224, help='side of the 224-size input')
    parser.add_argument('--detection', type=int, nargs=2, default=[800, 1333],
                        metavar=('H', 'W'), help='detection-size input (default 800 1333)')
    parser.add_argument('--base-channels', type=int, default=64,
                        help='backbone width; below 64 only for a quick check of the tool')
    parser.add_argument('--out', default='benchmark.json', help='JSON results file')
    parser.add_argument('--merge', nargs='+', metavar='JSON',
                        help='measure nothing: merge these result files into one table')
    parser.add_argument('--quiet', action='store_true', help='no progress messages')
    return parser.parse_args()


def main() -> None:
    args = parse_args()

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    if args.merge:
        runs = []
        for path in args.merge:
            with open(path) as f:
                runs.append(json.load(f))
        results = merge(runs)
    else:
        results = run(depths=args.depths, blocks=args.blocks, settings=args.settings,
                      rounds=args.rounds, warmup=args.warmup, repeat=args.repeat,
                      keep_memory=not args.default_malloc, device=args.device,
                      base_channels=args.base_channels, image=args.image,
                      detection=tuple(args.detection), memory=not args.no_memory, log=log)
    table = markdown(results)
    results['markdown'] = table
    with open(args.out, 'w') as f:
        json.dump(results, f, indent=1)
    print(table)
    print(f'Results written to {args.out}')


if __name__ == '__main__':
    main()
