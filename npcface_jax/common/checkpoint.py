"""Checkpoints of the train state and the input position, with orbax.

Saves are asynchronous (the arrays are copied to host memory, then written
in the background while training goes on), every N steps and on demand, and
keep the newest few. A restore lays every array out as the current run
wants it, so a checkpoint written on 8 devices restores onto 1 or 16; the
classifier's zero padding rows (their count depends on the 'model' axis)
are added or dropped on the way.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P


class Checkpointer:
  """A CheckpointManager for (train state, input position) pairs."""

  def __init__(self, directory: str, *, keep: int, every_steps: int,
               asynchronous: bool = True, read_only: bool = False):
    """``read_only``: for readers such as evaluation, which may run while
    training writes: no unfinished save is cleaned up."""
    self.directory = os.path.abspath(directory)
    self._options = dict(keep=keep, every_steps=every_steps,
                         asynchronous=asynchronous)
    if not read_only:
      _remove_unfinished(self.directory)
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    o = self._options
    return ocp.CheckpointManager(
        self.directory,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'input': ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=o['keep'],
            save_interval_steps=max(o['every_steps'], 1),
            enable_async_checkpointing=o['asynchronous']))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, input_state: dict,
           force: bool = False) -> bool:
    """Saves when ``step`` is on the interval (or ``force``); True if it did.
    A failed write (this one, or an earlier asynchronous one surfacing now)
    raises CheckpointWriteError; the checkpoints already on disk stay."""
    try:
      return self._manager.save(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              input=ocp.args.JsonSave(dict(input_state))),
          force=force)
    except Exception as e:
      raise self._write_error(step, e) from e

  def _write_error(self, step: int | None, error: Exception):
    """The error for a failed save of ``step`` (None: an asynchronous save
    whose step orbax does not report)."""
    done = [s for s in self.all_steps() if s != step]
    resume = (f'rerun with the same --workdir to resume from step '
              f'{max(done)}' if done else 'rerun to start again')
    which = 'a checkpoint' if step is None else f'a checkpoint (step {step})'
    return CheckpointWriteError(
        f'writing {which} to {self.directory} failed: '
        f'{type(error).__name__}: {error}. The checkpoints already there '
        f'({done or "none"}) are intact; free space or fix the directory, '
        f'then {resume}.')

  def restore(self, target: Any, step: int | None = None
              ) -> tuple[Any, dict, int] | None:
    """(state, input position, step) of the newest (or the given) step,
    laid out like ``target`` (a tree of jax.ShapeDtypeStruct with
    shardings); None when there is no checkpoint yet.

    A newest checkpoint that cannot be read (corrupt, half written) is moved
    aside as corrupt-<step>-<time> with a warning, and the previous one is
    restored instead; nothing is deleted."""
    if step is not None:
      return self._restore(target, step)
    while (latest := self._manager.latest_step()) is not None:
      try:
        return self._restore(target, latest)
      except CheckpointMismatch:
        raise
      except Exception as e:  # noqa: BLE001 (orbax raises many kinds)
        aside = self._move_aside(latest)
        logging.warning('checkpoint %s/%d cannot be read (%s: %s); moved '
                        'it to %s and trying the one before it',
                        self.directory, latest, type(e).__name__,
                        str(e)[:500], aside)
    return None

  def _move_aside(self, step: int) -> str:
    aside = os.path.join(self.directory,
                         f'corrupt-{step}-{int(time.time())}')
    if jax.process_index() == 0:
      os.replace(os.path.join(self.directory, str(step)), aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint aside {step}')
    self._manager.close()
    self._manager = self._open()
    return aside

  def _restore(self, target: Any, step: int) -> tuple[Any, dict, int]:
    saved = self._manager.item_metadata(step)['state']
    abstract, fixes = _restore_targets(target, saved, self.directory, step)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            input=ocp.args.JsonRestore()))
    state = jax.tree.map(lambda a, t, fix: fix(a, t) if fix else a,
                         restored['state'], target, fixes,
                         is_leaf=lambda x: x is None)
    return state, dict(restored['input']), step

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def restore_parts(self, parts: dict, sharding, step: int | None = None
                    ) -> tuple[dict, int]:
    """(arrays, step): only the state's subtrees named by ``parts`` (e.g.
    {'params': ['backbone'], 'batch_stats': None} for evaluation), each
    array laid out with ``sharding``, the rest never read; shapes come from
    the checkpoint, so no config has to rebuild the optimizer or classifier.
    """
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self.directory}: train '
                              'first, or point --workdir at a trained run')
    step = max(steps) if step is None else step
    if step not in steps:
      raise FileNotFoundError(f'no checkpoint of step {step} in '
                              f'{self.directory}; it has steps {steps}')
    saved = self._manager.item_metadata(step)['state']
    saved = getattr(saved, 'tree', saved)
    subset = {key: saved[key] if children is None else
              {c: saved[key][c] for c in children}
              for key, children in parts.items()}
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
        subset)
    # The manager's handler restores whole trees only; the state item is a
    # PyTree checkpoint, which a PyTreeCheckpointer reads in part.
    with ocp.PyTreeCheckpointer() as reader:
      out = reader.restore(
          os.path.join(self.directory, str(step), 'state'),
          args=ocp.args.PyTreeRestore(
              abstract, partial_restore=True,
              restore_args=ocp.checkpoint_utils.construct_restore_args(
                  abstract)))
    return out, step

  def reached_preemption(self, step: int) -> bool:
    """Whether JAX's preemption sync (several processes) says stop here."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until every started save is on disk; CheckpointWriteError if
    one failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._write_error(None, e) from e

  def close(self) -> None:
    """Waits for the saves and releases the manager; a failed save is
    logged, not raised (call wait() first to see it raised)."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      logging.error('%s', self._write_error(None, e))
    self._manager.close()


def _remove_unfinished(directory: str) -> None:
  """Deletes the temporary folders of saves cut short (killed, disk full)
  before the manager starts. Done here, synchronously: orbax's own
  cleanup_tmp_directories runs in the background and raced with the first
  save of the same step, which reuses the same temporary name."""
  if jax.process_index() == 0 and os.path.isdir(directory):
    for name in sorted(os.listdir(directory)):
      if '.orbax-checkpoint-tmp' in name:
        logging.warning('removing %s/%s: a checkpoint save that never '
                        'finished', directory, name)
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('checkpoint tmp cleanup')


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; earlier ones are intact."""


class CheckpointMismatch(ValueError):
  """The checkpoint was written by another model, head or optimizer."""


def _restore_targets(target, saved, directory, step):
  """Per leaf: what to ask orbax for, and how to fix up what it returns.

  Leaves whose saved shape differs from the target's only in the leading
  (class) dimension are restored whole, replicated, and then padded with
  zero rows or cut back to the target's row count."""
  saved_tree = getattr(saved, 'tree', saved)
  saved_shapes = {_path_key(p): tuple(s.shape) for p, s in
                  jax.tree_util.tree_leaves_with_path(saved_tree)}
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
  abstract, fixes = [], []
  for path, t in paths_leaves:
    key = _path_key(path)
    if key not in saved_shapes:
      raise CheckpointMismatch(
          f'checkpoint {directory}/{step} has no array {key!r}: it was '
          'written by a different model, head or optimizer; use another '
          '--workdir')
    shape = saved_shapes[key]
    if shape == tuple(t.shape):
      abstract.append(t)
      fixes.append(None)
      continue
    if len(shape) != len(t.shape) or shape[1:] != tuple(t.shape[1:]):
      raise CheckpointMismatch(
          f'checkpoint {directory}/{step} holds {key!r} of shape {shape} '
          f'where this run has {tuple(t.shape)}: it was written by a '
          'different model or class count; use another --workdir')
    replicated = NamedSharding(t.sharding.mesh, P())
    abstract.append(jax.ShapeDtypeStruct(shape, t.dtype, sharding=replicated))
    fixes.append(_resize_rows)
  return treedef.unflatten(abstract), treedef.unflatten(fixes)


def _path_key(path) -> str:
  """'params/classifier': the simple form names attributes, dict keys and
  indices alike, so that a dataclass state and its saved dict form match."""
  return jax.tree_util.keystr(path, simple=True, separator='/')


def _resize_rows(array: jax.Array, target) -> jax.Array:
  rows = target.shape[0]
  have = array.shape[0]
  if have > rows:
    dropped = np.asarray(jax.device_get(array[rows:]))
    if np.any(dropped):
      raise CheckpointMismatch(
          f'cannot restore {have} classifier rows into {rows}: the dropped '
          'rows are not padding (they are not zero)')
    array = array[:rows]
  else:
    array = jnp.pad(array, [(0, rows - have)] + [(0, 0)] * (array.ndim - 1))
  logging.info('checkpoint rows %d -> %d (padding for the model axis)', have,
               rows)
  return jax.device_put(array, target.sharding)
