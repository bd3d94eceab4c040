"""Save a grid of an image, the feature norm before and after an attention block, and the
block's attention map (the saliency figures of the SGE and CGD papers). Runs on the CPU."""
import argparse
import sys

import mmattn  # noqa: F401  (registers the blocks, makes checkpoints load safely)
from mmattn.analysis import visualize_attention
from mmattn.apis import exit_on_known_error


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('image', help='image file')
    parser.add_argument('--block', help='attention block in the backbone, e.g. layer3.5.sge '
                        '(default: the last one of stage 3)')
    parser.add_argument('--out', default='attention.png', help='PNG to write (%(default)s)')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with exit_on_known_error():
        try:
            visualize_attention(args.config, args.checkpoint, args.image, args.block, args.out)
        except (ValueError, FileNotFoundError) as err:
            sys.exit(f'error: {err}')
    print(f'Saved {args.out}')


if __name__ == '__main__':
    main()
