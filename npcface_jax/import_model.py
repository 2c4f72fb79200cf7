"""Imports a face recognition model trained elsewhere as a run directory.

    python -m npcface_jax.import_model SRC [SRC2] --workdir=DIR
        [--images=FACES] [--license=TEXT]
        [--channels=RGB|BGR --center=X --scale=Y]

SRC is a released PyTorch checkpoint: insightface arcface_torch's
``backbone.pth`` (iresnet18-200, mbf, mbf_large), FaceX-Zoo's ``.pt``
(IR / IR-SE ResNets, MobileFaceNet) or AdaFace's Lightning ``.ckpt`` (IR
ResNets), in torch's zip or legacy format; or an insightface MXNet model
zoo model: SRC the ``.params`` and SRC2 its ``-symbol.json`` (default:
the one beside it, ``model-0000.params`` -> ``model-symbol.json``), the
LResNet-IR models of fresnet.py ('E' output: LResNet34/50/100E-IR, r100
ArcFace) and MobileFaceNet "y1" (fmobilefacenet.py, 'GDC'). The format is
read from the file's first bytes. Both are read without their frameworks
and without running anything the files hold. The backbone and its
variant come from the tensors' names and shapes (MXNet: and the graph's
nodes); the input contract (channel order and normalisation) from the
source's documented default (MXNet: the graph's own preprocessing, RGB),
which the flags override.

Or SRC is an ONNX face recogniser (told by its ``.onnx`` extension or by
being a ModelProto that onnx parses; the ``[export]`` extra):
insightface's ``w600k_r50.onnx``, ``glintr100.onnx`` (iresnet50/100) and
``w600k_mbf.onnx``, as arcface_torch's torch2onnx.py exports them (BNs
folded into convs or not). The backbone is read from the graph's
structure, not its names (foreign/onnx_layouts.py); the input contract
defaults to arcface_torch's RGB, (x - 127.5) / 127.5, which insightface
applies outside these graphs.

The import proves itself before anything is written: the imported
backbone (float32, as every command runs it) and the source's own
computation (PyTorch: a float64 NumPy forward of its architecture,
written from its PyTorch code; MXNet: the symbol graph itself computed in
float64 NumPy from MXNet's operator semantics; ONNX: the graph itself
under onnxruntime, fed NCHW float32) embed the same faces
(``--images``: aligned crops; by default 16 faces of random pixels) and
must agree to a minimum cosine of 0.9999. Then DIR gets run.json (the
config; under "imported": the source files' paths, sha256 and format, the
layout, the parity figure and the licence you state) and a checkpoint at
step 0, and `evaluate`, `verify`, `embed`, `identify`, `export` and
`--config.init_from` take DIR as a run trained here. Released face models
mostly carry non-commercial licences: ``--license`` records what yours
says, and the model card repeats it.
"""

from __future__ import annotations

import datetime
import os
import sys

import numpy as np

from npcface_jax.common import run_log
from npcface_jax.faces import images
from npcface_jax.foreign import (mxnet_import, onnx_import, onnx_layouts,
                                 torch_checkpoint, torch_import,
                                 torch_layouts)
from npcface_jax.serving import model_card, run_dir, trained_run

MIN_COSINE = 0.9999
RANDOM_FACES = 16
_MXNET_LIST_MAGIC = (0x112).to_bytes(8, 'little')


def _file_record(path: str) -> dict:
  return {'source': os.path.abspath(path), 'sha256': model_card.sha256(path),
          'bytes': os.path.getsize(path)}


def _format(path: str) -> str:
  """'mxnet', 'onnx' or 'torch', from the file's first bytes (ONNX: or
  its extension); files named for a format they are not are refused."""
  with open(path, 'rb') as f:
    head = f.read(8)
  if head == _MXNET_LIST_MAGIC:
    return 'mxnet'
  if head.lstrip()[:1] == b'{':
    raise ValueError(f'{path} is JSON (an MXNet -symbol.json?): give the '
                     '.params file first and the symbol file second')
  if path.endswith('.params'):
    raise ValueError(f'{path} is named .params but does not start with '
                     "MXNet's NDArray list magic 0x112: not an MXNet params "
                     'file')
  if onnx_layouts.looks_like_onnx(path):
    return 'onnx'
  return 'torch'


def _contract(imported, channels, center, scale) -> images.InputContract:
  """The source's contract with the flags' fields over it."""
  base = imported.contract
  if base is None and None in (channels, center, scale):
    raise ValueError(
        f'{imported.source}: its input contract is unknown (a bare state '
        'dict): give --channels, --center and --scale as it was trained '
        '(FaceX-Zoo: BGR 127.5 128; AdaFace: BGR 127.5 127.5)')
  base = base or images.InputContract()
  return images.InputContract(
      channels or base.channels, base.center if center is None else center,
      base.scale if scale is None else scale).check('--channels/--center/'
                                                    '--scale')


def _faces(paths: list[str], size: int) -> tuple[np.ndarray, str]:
  if not paths:
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (RANDOM_FACES, size, size, 3), np.uint8),
            f'{RANDOM_FACES} faces of random pixels (seed 0)')
  root, names = trained_run.list_sources(paths)
  found = [b for b in images.ImageBatches(names, size, 64, root=root)
           if len(b)]
  if not found:
    raise ValueError(f'--images: no readable image among {len(names)}')
  faces = np.concatenate(found)[:64]
  return faces, f'{len(faces)} aligned crops from {", ".join(paths)}'


def _config(imported, contract: images.InputContract):
  from npcface_jax.training import run_flags  # noqa: PLC0415 (configs/)
  config = run_flags.default_config()
  config.model = imported.model
  config.model_options = dict(imported.options)
  config.embedding_dim = imported.embedding_dim
  config.input = contract._asdict()
  config.dataset = ''
  config.verification_targets = ''
  return config


def _layout_fields(imported, dtypes) -> dict:
  """The record's fields every format has: what was found, and what was
  left out of the backbone."""
  layout = imported.layout
  return {'layout': layout.family, 'made_by': imported.source,
          'stored_dtypes': sorted(dtypes), 'left_out': layout.left_out[:20],
          'left_out_count': len(layout.left_out)}


def _load(source: str, symbol: str | None):
  """(imported, its parity function, input side, what parity is against,
  the format's part of the record)."""
  kind = _format(source)
  if symbol and kind != 'mxnet':
    raise ValueError(f'{symbol}: a second file is for MXNet models only '
                     f'(the -symbol.json of a .params); {source} is not one')
  if kind == 'mxnet':
    imported = mxnet_import.load(source, symbol)
    dtypes = {str(a.dtype) for a in imported.params.values()}
    return imported, mxnet_import.parity, imported.image_size, (
        mxnet_import.AGAINST), {
            'format': 'MXNet (symbol + params)',
            'symbol': _file_record(imported.symbol),
            'graph_input': imported.layout.input_from,
            'fixed_gamma': imported.layout.fixed_gamma,
            **_layout_fields(imported, dtypes)}
  if kind == 'onnx':
    imported = onnx_import.load(source)
    m = imported.onnx
    return imported, onnx_import.parity, onnx_import.IMAGE_SIZE, (
        onnx_import.against()), {
            'format': 'ONNX', 'opset': m.opset, 'producer': m.producer,
            'ir_version': m.ir_version, 'graph_input': m.input_name,
            **_layout_fields(imported, m.dtypes)}
  imported = torch_import.load(source)
  return imported, torch_import.parity, torch_import.IMAGE_SIZE, (
      torch_import.AGAINST), {
          'format': f'PyTorch checkpoint ({imported.checkpoint.format})',
          'prefix': imported.layout.prefix,
          **_layout_fields(imported, imported.checkpoint.dtypes)}


def import_model(source: str, workdir: str, image_paths=(), license=None,
                 channels=None, center=None, scale=None, symbol=None,
                 log=print) -> dict:
  """Reads, checks and writes; returns the import record (run.json's
  "imported"). ``symbol``: an MXNet model's -symbol.json (default: the one
  beside ``source``). ValueError naming the fault when the file is not a
  model we read, the contract is unknown, or parity fails."""
  imported, parity_of, size, against, about = _load(source, symbol)
  contract = _contract(imported, channels, center, scale)
  log(f'{source}: {imported.source}, {imported.model} '
      f'{imported.options or ""} {imported.embedding_dim}-d; input '
      f'{contract.describe()}')
  faces, what = _faces(list(image_paths), size)
  cosines = parity_of(imported, faces, contract)
  parity = {'min_cosine': float(cosines.min()),
            'mean_cosine': float(cosines.mean()), 'faces': what,
            'required': MIN_COSINE, 'against': against}
  log(f'parity on {what}: minimum cosine {parity["min_cosine"]:.7f} '
      f'(required {MIN_COSINE})')
  if not cosines.min() >= MIN_COSINE:
    raise ValueError(f'{source}: the imported backbone does not reproduce the '
                     f'source (minimum cosine {cosines.min():.6f} < '
                     f'{MIN_COSINE}); nothing was written')
  record = {
      **_file_record(source), **about,
      'input': contract._asdict(), 'parity': parity,
      'license': license or 'not stated',
      'imported_at': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds')}
  run_dir.write_imported(workdir, _config(imported, contract),
                         imported.variables, size, record)
  return record


def main(argv) -> None:
  from absl import flags  # noqa: PLC0415 (the command's flags only)
  f = flags.FLAGS
  if len(argv) not in (2, 3):
    raise SystemExit('give one model: python -m npcface_jax.import_model '
                     'SRC [SRC2] --workdir=DIR (SRC2: an MXNet .params\'s '
                     '-symbol.json)')
  run_log.quiet_third_party(f.verbose)
  try:
    record = import_model(argv[1], f.workdir, f.images or (), f.license,
                          f.channels, f.center, f.scale,
                          argv[2] if len(argv) == 3 else None)
  except (ValueError, OSError, torch_checkpoint.TorchFileError,
          torch_layouts.LayoutError, onnx_layouts.MissingExtra) as e:
    raise SystemExit(f'error: {e}') from None
  print(f'imported into {f.workdir} (licence: {record["license"]}); '
        f'evaluate it with python -m npcface_jax.evaluate '
        f'--workdir={f.workdir} --targets=PAIRS.bin', file=sys.stdout)


def _define_flags() -> None:
  from absl import flags  # noqa: PLC0415 (the command's flags only)
  flags.DEFINE_string('workdir', None, 'A new (or empty) directory for the '
                      'run.')
  flags.DEFINE_list('images', None, 'Check parity on these aligned face crops '
                    "(at the model's size, 112x112 for released ones; a "
                    'folder, a list file or files; at most 64) instead of '
                    'random pixels.')
  flags.DEFINE_string('license', None, 'The licence the model was released '
                      'under, as you read it (recorded in run.json and the '
                      'model card).')
  flags.DEFINE_enum('channels', None, ['RGB', 'BGR'], 'The channel order '
                    "the model was trained on (default: the source's).")
  flags.DEFINE_float('center', None, 'Inputs are (x - center) / scale '
                     "(default: the source's).")
  flags.DEFINE_float('scale', None, 'See --center.')
  flags.DEFINE_bool('verbose', False, 'Also log the INFO lines of '
                    'TensorFlow, orbax, absl and JAX.')
  flags.mark_flags_as_required(['workdir'])


if __name__ == '__main__':
  from absl import app
  _define_flags()
  app.run(main)
