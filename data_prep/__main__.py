"""Command line: ``python -m data_prep {train,pairs,check} ...``; parses the
flags and calls ``train_set.convert``, ``pairs.convert`` or
``check.check``."""

from __future__ import annotations

import argparse
import sys

from data_prep import DataPrepError
from npcface_jax.common import run_log
from npcface_jax.faces import detection

_TRAIN = """\
SRC is detected: an image folder root/<identity>/<image>, a folder or file
.rec with its .idx (insightface or im2rec layout), or a list file of
"path label" lines (paths relative to the list's folder). OUT receives
npcface-train.tfrecord-XXXXX-of-NNNNN shards of tf.train.Example
{image: JPEG, label: int64}, tfds metadata (tfds.builder_from_directory(OUT)),
label_map.json (names, index = label) and report.json (counts, skipped
images and why, options)."""

_PAIRS = """\
PAIRS is an LFW pairs.txt ("name i j" same, "name1 i name2 j" different;
images at IMAGES/name/name_%04d.jpg; an optional header line) or a list of
"path1 path2 same" lines (paths relative to IMAGES, same 1 or 0). OUT.bin is
an insightface verification .bin: pickle of (JPEG bytes, issame list)."""

_CHECK = """\
OUT is a `data_prep train` output. Every record of every shard is read:
its TFRecord framing (the masked CRC32C of each length and each record),
its image (a JPEG that decodes to the metadata's size) and its label (in
[0, num_classes)), and each shard's count against the metadata. Prints a
line per shard, each problem with its byte offset and record index, and a
verdict; exit status 0 when all is intact, 1 when problems were found."""


def _add_preprocessing(p: argparse.ArgumentParser) -> None:
  p.add_argument('--image-size', type=int, default=112, metavar='S',
                 help='output images are S x S (default 112)')
  fit = p.add_mutually_exclusive_group()
  fit.add_argument('--crop', dest='fit', action='store_const', const='crop',
                   help='centre square crop before resizing (unaligned sets)')
  fit.add_argument('--pad', dest='fit', action='store_const', const='pad',
                   help='fit inside S x S, centred on black (as the ORL .rec '
                        'and .bin fixtures are)')
  p.set_defaults(fit='resize')
  p.add_argument('--landmarks', metavar='FILE',
                 help='"path x1 y1 ... x5 y5" lines (eyes, nose, mouth '
                      'corners; paths relative to the image folder: SRC, the '
                      "list file's or IMAGES; or absolute; record keys for a "
                      '.rec): align '
                      'each image to the ArcFace template; images without a '
                      'line are skipped (with --detect: detected)')
  p.add_argument('--detect', action='store_true',
                 help='find the face in each image without a --landmarks '
                      'line (MTCNN, the [detect] extra) and align it on its '
                      "landmarks; photos with no face are skipped ('no "
                      "face')")
  p.add_argument('--min-face-score', type=float, default=None, metavar='P',
                 help='with --detect: the lowest detector score that counts '
                      f'as a face (default {detection.MIN_SCORE})')
  p.add_argument('--save-landmarks', metavar='FILE',
                 help='write the landmarks each aligned image was aligned on '
                      '(detected or given) in the --landmarks format; '
                      '--landmarks FILE then reproduces the same images '
                      'without detecting')
  p.add_argument('--workers', type=int, default=None, metavar='N',
                 help='decode/encode processes (default: all cores)')
  p.add_argument('--overwrite', action='store_true',
                 help='replace an earlier output')
  p.add_argument('--quiet', action='store_true', help='no progress bar')
  p.add_argument('--verbose', action='store_true',
                 help="also TensorFlow's start-up lines (its workers' too)")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m data_prep',
      description='Face datasets into npcface_jax training shards and '
                  'verification .bin files.')
  commands = p.add_subparsers(dest='command',
                               metavar='{train,pairs,check}')
  train = commands.add_parser(
      'train', help='images -> TFRecord shards with tfds metadata',
      description=_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
  train.add_argument('src', metavar='SRC')
  train.add_argument('out', metavar='OUT')
  _add_preprocessing(train)
  train.add_argument('--exclude-identities', metavar='FILE',
                     help='identity names to leave out, one a line (e.g. the '
                          'overlap with a test set)')
  train.add_argument('--min-images-per-identity', type=int, default=1,
                     metavar='N', help='drop identities with fewer valid '
                                       'images (default 1)')
  train.add_argument('--shards', type=int, default=None, metavar='N',
                     help='number of shards (default: one per 10k images)')
  train.add_argument('--seed', type=int, default=0,
                     help='seed of the order examples are written in')
  pairs = commands.add_parser(
      'pairs', help='pairs file -> insightface verification .bin',
      description=_PAIRS, formatter_class=argparse.RawDescriptionHelpFormatter)
  pairs.add_argument('pairs', metavar='PAIRS')
  pairs.add_argument('images', metavar='IMAGES')
  pairs.add_argument('out', metavar='OUT.bin')
  _add_preprocessing(pairs)
  check = commands.add_parser(
      'check', help="verify a training set's shards before a long run",
      description=_CHECK, formatter_class=argparse.RawDescriptionHelpFormatter)
  check.add_argument('out', metavar='OUT')
  check.add_argument('--workers', type=int, default=None, metavar='N',
                     help='shards checked at once (default: all cores)')
  check.add_argument('--quiet', action='store_true',
                     help='print only the shards with problems')
  return p


def _check(args) -> int:
  from data_prep import check  # noqa: PLC0415
  if args.workers is not None and args.workers < 1:
    raise DataPrepError(f'--workers must be at least 1, got {args.workers}')
  report = check.check(args.out, workers=args.workers, quiet=args.quiet)
  return 1 if report['problems'] else 0


def main(argv=None) -> int:
  p = parser()
  args = p.parse_args(argv)
  # Before TensorFlow loads here or in a worker (they inherit it).
  run_log.quiet_tensorflow_startup(getattr(args, 'verbose', False))
  if args.command is None:
    p.print_help(sys.stderr)
    return 2
  if args.command == 'check':
    try:
      return _check(args)
    except DataPrepError as e:
      print(f'python -m data_prep check: error: {e}', file=sys.stderr)
      return 1
  if args.min_face_score is not None and not args.detect:
    p.error('--min-face-score applies to detected faces; add --detect or '
            'drop it')
  faces = dict(landmarks=args.landmarks, detect=args.detect,
               save_landmarks=args.save_landmarks,
               min_face_score=(detection.MIN_SCORE if args.min_face_score is
                               None else args.min_face_score))
  try:
    if args.command == 'train':
      from data_prep import train_set  # noqa: PLC0415
      train_set.convert(
          args.src, args.out, image_size=args.image_size, fit=args.fit,
          **faces, exclude_identities=args.exclude_identities,
          min_images_per_identity=args.min_images_per_identity,
          num_shards=args.shards, workers=args.workers, seed=args.seed,
          overwrite=args.overwrite, progress=not args.quiet)
    else:
      from data_prep import pairs  # noqa: PLC0415
      pairs.convert(args.pairs, args.images, args.out,
                    image_size=args.image_size, fit=args.fit, **faces,
                    workers=args.workers,
                    overwrite=args.overwrite, progress=not args.quiet)
  except DataPrepError as e:
    print(f'python -m data_prep {args.command}: error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
