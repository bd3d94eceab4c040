"""Convert an attention paper's ImageNet checkpoint into an AttnResNet classifier checkpoint.

Prints the backbone config the weights fit and the init_cfg line that loads them into a
detector. Nothing is written when a key has no place, the weights do not fit the inferred model,
the file carries pickled code, or DST exists (without --force).
"""
import argparse
import sys

from mmdet.models.backbones import ResNet

import mmattn  # noqa: F401  (registers the blocks, makes checkpoints load safely)
from mmattn.checkpoint import (
    SOURCE_FORMATS,
    ConversionError,
    convert_checkpoint,
    describe_conversion,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('src', help="the authors' checkpoint (.pth, .pth.tar)")
    parser.add_argument('dst', help='where the converted mmengine checkpoint goes')
    parser.add_argument('--format', default='auto', choices=['auto', *SOURCE_FORMATS],
                        help='source layout; auto detects it from the keys (default)')
    parser.add_argument('--depth', type=int, choices=sorted(ResNet.arch_settings),
                        help='the ResNet depth the keys must hold (default: read from the keys)')
    parser.add_argument('--allow-unplaced', action='store_true',
                        help='drop source keys that have no AttnResNet counterpart instead of '
                             'refusing')
    parser.add_argument('--force', action='store_true', help='replace DST if it exists')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        conversion = convert_checkpoint(args.src, args.dst, args.format, args.depth,
                                        allow_unplaced=args.allow_unplaced, force=args.force)
    except ConversionError as err:
        print(f'convert_checkpoint: error: {err}', file=sys.stderr)
        return 1
    print(describe_conversion(conversion, args.src, args.dst))
    return 0


if __name__ == '__main__':
    sys.exit(main())
