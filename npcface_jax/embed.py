"""``python -m npcface_jax.embed --workdir=DIR SRC [SRC ...] OUT``: photos
(or aligned crops) to L2-normalised embeddings.

SRC is a folder (every image in it, any depth), a list file (a path a line,
relative to the list's folder) or image files. OUT (a folder) receives
``embeddings.npy`` (N, D) float32, one row per readable image,
``norms.npy`` (N,) float32, each row's raw embedding norm (the backbone's
output before L2 normalisation; with --flip the mean of the face's and its
mirror's), and ``embed.json``: the row names in order, the same norms as
a 'norms' column beside them, what was skipped and why, the run, step and
settings. The norm is a face-quality score only for heads that train it
(MagFace, AdaFace); for the others it is still written, and means little.
Photos' landmarks go to ``landmarks.txt`` in data_prep's ``--landmarks``
format, so that ``data_prep --landmarks`` reuses them.
"""

from __future__ import annotations

import io
import os

import numpy as np

from npcface_jax.common import jsonfile, run_log
from npcface_jax.faces import alignment, detection
from npcface_jax.serving import trained_run

FILES = ('embeddings.npy', 'norms.npy', 'embed.json', 'landmarks.txt')


def embed(model: trained_run.Model, sources: list[str], out: str, *,
          aligned: bool = False, min_score: float = detection.MIN_SCORE,
          overwrite: bool = False, progress: bool = True) -> dict:
  """Embeds what ``sources`` name (trained_run.list_sources) into ``out``;
  returns what embed.json holds."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f'OUT {out} is a file; give a folder to write into')
  taken = [n for n in FILES if os.path.exists(os.path.join(out, n))]
  if taken and not overwrite:
    raise ValueError(f'{out} already holds {", ".join(taken)}; pass '
                     '--overwrite to replace them, or another OUT')
  root, names = trained_run.list_sources(sources)
  got = trained_run.embed_images(model, names, aligned=aligned, root=root,
                                 min_score=min_score, progress=progress,
                                 with_norms=True)
  os.makedirs(out, exist_ok=True)
  for name, array in (('embeddings.npy', got.embeddings),
                      ('norms.npy', got.norms)):
    buffer = io.BytesIO()
    np.save(buffer, array)
    jsonfile.atomic_write(os.path.join(out, name), buffer.getvalue())
  landmarks = os.path.join(out, 'landmarks.txt')
  if got.landmarks:
    alignment.write_landmarks(landmarks, {
        names[i]: p for i, p in got.landmarks.items()})
  elif os.path.exists(landmarks):  # an earlier run's, not these images'
    os.remove(landmarks)
  record = {
      'workdir': os.path.abspath(model.workdir), 'step': model.step,
      'flip': model.flip, 'aligned': aligned, 'image_size': model.image_size,
      'min_face_score': None if aligned else min_score,
      'root': root, 'num_images': len(names),
      'num_embedded': len(got.kept), 'embedding_dim': (
          int(got.embeddings.shape[1])),
      'names': [names[i] for i in got.kept],
      'norms': [float(x) for x in got.norms],
      'skipped': [{'name': s.name, 'reason': s.reason}
                  for s in got.skipped]}
  jsonfile.write_object(os.path.join(out, 'embed.json'), record)
  return record


def main(argv):
  from absl import app, flags  # noqa: PLC0415 (the command only)
  f = flags.FLAGS
  run_log.quiet_third_party(f.verbose)
  if len(argv) < 3:
    raise app.UsageError('give SRC (a folder, a list file or images) and '
                         'OUT (a folder)')
  try:
    model = trained_run.open_model(f.workdir, f.step, f.flip, f.batch_size)
    record = embed(model, argv[1:-1], argv[-1], aligned=f.aligned,
                   min_score=f.min_face_score, overwrite=f.overwrite)
  except (ValueError, FileNotFoundError, detection.MissingExtra) as e:
    raise app.UsageError(str(e)) from None
  print(f"embedded {record['num_embedded']} of {record['num_images']} images "
        f"(step {record['step']}{', flip' * record['flip']}) into "
        f"{argv[-1]}/embeddings.npy (raw norms: norms.npy); names and "
        "skipped in embed.json")
  for s in record['skipped'][:10]:
    print(f"skipped {s['name']}: {s['reason']}")
  if len(record['skipped']) > 10:
    print(f"... and {len(record['skipped']) - 10} more (embed.json)")


def _define_flags():
  from absl import flags  # noqa: PLC0415
  trained_run.define_flags(threshold=False)
  flags.DEFINE_bool('overwrite', False, 'Replace the files of an earlier '
                    'embed in OUT.')


if __name__ == '__main__':
  from absl import app
  _define_flags()
  app.run(main)
