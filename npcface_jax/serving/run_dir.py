"""A run's directory: what training writes there for the commands that
come after it (run.json: the config, the data's sizes and the damaged
records skipped), read back with every fault named, and the trained
backbone restored from its checkpoints without the classifier or the
optimizer state."""

from __future__ import annotations

import json
import os
import shutil

import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from npcface_jax.common import checkpoint, jsonfile

RUN_INFO = 'run.json'
# The damaged records training skipped: {'examples': lost from every epoch,
# 'records': [{'shard', 'offset', 'bytes', 'examples', 'what'}]}. Runs
# written before it lack it (damaged_records reads them as none).
DAMAGED = 'damaged_records'


def write_run_info(workdir: str, config, data, head_options: dict) -> None:
  """workdir/run.json: the config and the data's sizes (``data``: a
  training.data_source.Data), so that evaluation rebuilds the model from
  the workdir, and the head's options as trained (``head.options``:
  NPCFace's preset filled in); the damaged records an earlier part of the
  run noted are kept."""
  path = os.path.join(workdir, RUN_INFO)
  info = {'config': json.loads(config.to_json_best_effort()),
          'head_options': dict(head_options),
          'image_size': data.image_size, 'num_classes': data.num_classes,
          DAMAGED: _damage_field(_earlier_damage(path))}
  jsonfile.write_object(path, info)


def _earlier_damage(path: str) -> list[dict]:
  try:
    return damaged_records(jsonfile.read_object(path))
  except (OSError, ValueError):  # none yet, or damaged: written anew
    return []


def _damage_field(records: list[dict]) -> dict:
  records = sorted(records, key=lambda r: (str(r['shard']), r['offset']))
  return {'examples': sum(int(r.get('examples', 0)) for r in records),
          'records': records}


def damaged_records(info: dict) -> list[dict]:
  """The damaged records in a run.json's contents (none for a run.json
  written before the field)."""
  field = info.get(DAMAGED)
  records = field.get('records') if isinstance(field, dict) else None
  if not isinstance(records, list):
    return []
  return [r for r in records if isinstance(r, dict) and 'shard' in r
          and isinstance(r.get('offset'), int)]


def record_damage(workdir: str, records: list[dict]) -> None:
  """Adds the damaged records the input met to workdir/run.json, beside
  those noted before (a resumed run meets the same ones again)."""
  path = os.path.join(workdir, RUN_INFO)
  info = jsonfile.read_object(path)
  merged = {(str(r['shard']), r['offset']): r
            for r in damaged_records(info) + list(records)}
  info[DAMAGED] = _damage_field(list(merged.values()))
  jsonfile.write_object(path, info)


def load_run(workdir: str):
  """(config, image size) the run in workdir was trained with (run.json);
  ValueError naming the file, what is wrong with it and the fix."""
  path = os.path.join(workdir, RUN_INFO)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} not found: --workdir must be a directory that '
        'python -m npcface_jax.main trained in (it writes run.json)')
  fix = ('python -m npcface_jax.main writes it when training starts: '
         'restore the file, or re-run training with this --workdir')
  try:
    info = jsonfile.read_object(path)
  except ValueError as e:
    raise ValueError(f'{e}; {fix}') from None
  if not isinstance(info.get('config'), dict):
    what = 'not an object' if 'config' in info else 'missing'
    raise ValueError(f'{path}: "config" is {what}; {fix}')
  size = info.get('image_size')
  if isinstance(size, bool) or not isinstance(size, int) or not (
      0 < size <= 65535):
    raise ValueError(f'{path}: "image_size" is {size!r:.40}, not an image '
                     f'side in pixels (1 to 65535); {fix}')
  try:
    config = ml_collections.ConfigDict(info['config'])
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f'{path}: "config" is not a config ({e}); {fix}') from None
  return config, size


def restore_variables(workdir: str, mesh: Mesh, step: int | None = None):
  """(backbone variables replicated over the mesh, step) from the newest
  checkpoint in workdir, or the given step; the classifier and the
  optimizer state are not read."""
  checkpoints = checkpoint.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=1, every_steps=1,
      asynchronous=False, read_only=True)
  try:
    state, step = checkpoints.restore_parts(
        {'params': ['backbone'], 'batch_stats': None},
        NamedSharding(mesh, P()), step)
  finally:
    checkpoints.close()
  return {'params': state['params']['backbone'],
          'batch_stats': state['batch_stats']}, step


IMPORTED = 'imported'


def write_imported(workdir: str, config, variables: dict, image_size: int,
                   record: dict) -> None:
  """A run directory for a model trained elsewhere, which every command
  that takes a trained run takes: run.json (its config, and under
  'imported' the record of where it came from: source file, sha256,
  format, parity, licence) and a checkpoint at step 0 holding its
  backbone and BatchNorm statistics as training lays them out. Written
  beside ``workdir`` and moved there whole; ``workdir`` must not exist or
  be empty, so no run is overwritten."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and os.listdir(workdir):
    raise FileExistsError(f'{workdir} is not empty: import into a new '
                          '--workdir (nothing there is overwritten)')
  partial = f'{workdir}.partial-{os.getpid()}'
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  checkpoints = checkpoint.Checkpointer(
      os.path.join(partial, 'checkpoints'), keep=1, every_steps=1,
      asynchronous=False)
  try:
    checkpoints.save(0, {'params': {'backbone': variables['params']},
                         'batch_stats': variables['batch_stats']}, {},
                     force=True)
    checkpoints.wait()
  finally:
    checkpoints.close()
  jsonfile.write_object(os.path.join(partial, RUN_INFO), {
      'config': json.loads(config.to_json_best_effort()), 'head_options': {},
      'image_size': int(image_size), 'num_classes': None,
      DAMAGED: _damage_field([]), IMPORTED: record})
  if os.path.exists(workdir):
    os.rmdir(workdir)  # empty, checked above
  os.rename(partial, workdir)


def imported(workdir: str) -> dict | None:
  """The import record of a run made by import_model (None for a run
  trained here)."""
  info = jsonfile.read_object(os.path.join(workdir, RUN_INFO))
  record = info.get(IMPORTED)
  return record if isinstance(record, dict) else None
