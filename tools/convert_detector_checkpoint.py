"""Convert the authors' COCO detector checkpoint (mmdetection 0.6 / v1) for an mmattn config.

Runs mmdet's own v1 -> v2 upgrade (tools/model_converters/upgrade_model_version.py) in memory,
maps the backbone's attention keys to AttnResNet's, and writes DST only when the result loads
into CONFIG's model with strict=True. Then evaluate it with tools/test.py CONFIG DST.
"""
import argparse
import sys

import mmattn  # noqa: F401  (registers the blocks, makes checkpoints load safely)
from mmattn.checkpoint import ConversionError, convert_detector_checkpoint
from mmattn.checkpoint.safe_load import CheckpointRefusedError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('src', help="the authors' detector checkpoint (.pth)")
    parser.add_argument('dst', help='where the converted checkpoint goes')
    parser.add_argument('--config', required=True, help='the mmattn config it is for')
    parser.add_argument('--force', action='store_true', help='replace DST if it exists')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = convert_detector_checkpoint(args.src, args.dst, args.config, force=args.force)
    except (ConversionError, CheckpointRefusedError) as err:
        print(f'convert_detector_checkpoint: error: {err}', file=sys.stderr)
        return 1
    for line in result.log:
        print(line)
    if result.upgraded:
        print(f'upgraded from mmdet {result.source_version or "v1 (no meta)"} with mmdet\'s '
              'upgrade_model_version.convert')
    else:
        print(f'no v1 -> v2 upgrade needed (mmdet {result.source_version or "unknown"})')
    print(f'renamed {len(result.renamed)} backbone keys; {len(result.state_dict)} tensors load '
          f'into {args.config} with strict=True; wrote {args.dst}')
    print(f'next: .venv/bin/python tools/test.py {args.config} {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
