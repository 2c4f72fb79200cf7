"""Faults during training, each with its measured outcome: a NaN loss stops
the run naming the step (or is skipped), a corrupt newest checkpoint falls
back to the previous one, and a failed checkpoint write is reported with the
earlier checkpoints intact. (SIGTERM and kill -9 are in test_train.py.)"""

import errno
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from npcface_jax import models
from npcface_jax.common import arrays
from npcface_jax.common import checkpoint
from npcface_jax.training import data_source, loop, setup, train_step
from tests import tiny_backbone
from tests.test_train import _assert_same_params, _config


@pytest.fixture(autouse=True)
def small_backbone(monkeypatch):
  """The tests' small backbone in place of MobileFaceNet: the faults are
  the trainer's, and it compiles in a second rather than twenty."""
  monkeypatch.setattr(models, 'from_config', tiny_backbone.create_model)


class _Poisoned:
  """The training stream with NaN images in its ``at``-th batch."""

  def __init__(self, stream, at):
    self.stream, self.at, self.count = stream, at, 0

  def __next__(self):
    batch = next(self.stream)
    self.count += 1
    if self.count == self.at:
      batch = dict(batch, image=batch['image'] * jnp.nan)
    return batch

  def state(self):
    return self.stream.state()


def _poison(monkeypatch, at):
  real = data_source.open_data

  def open_data(config, mesh):
    data = real(config, mesh)
    return data._replace(open=lambda start: _Poisoned(data.open(start), at))

  monkeypatch.setattr(data_source, 'open_data', open_data)


def _restore(workdir, config, step=None):
  mesh = arrays.make_mesh(config.model_parallel)
  task = setup.make_task(config, mesh,
                         data_source.open_data(config, mesh))
  ckpt = checkpoint.Checkpointer(str(workdir / 'checkpoints'), keep=3,
                                 every_steps=100)
  try:
    return ckpt.restore(setup.abstract_state(task), step), ckpt.all_steps()
  finally:
    ckpt.close()


def _finite(state):
  return all(bool(np.all(np.isfinite(x)))
             for x in jax.tree.leaves(jax.device_get(state)))


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(
    tmp_path, monkeypatch, caplog):
  """NaN images in the 5th batch. With nonfinite='stop' the run ends naming
  step 5 and nothing is saved past it (the checkpoint of step 4 is the
  newest). With 'skip' that step changes nothing but the step counters
  (the state's and the schedule's): after it the state equals that
  checkpoint of 4 clean steps."""
  _poison(monkeypatch, at=5)
  c = _config(num_train_steps=6, checkpoint_every_steps=4, log_every_steps=2)
  with pytest.raises(loop.NonFiniteLoss,
                     match=r'step 5: .*newest checkpoint \(step 4\)'):
    loop.train_and_evaluate(c, str(tmp_path / 'stop'))
  (clean4, _, step), steps = _restore(tmp_path / 'stop', c)
  assert step == 4 and max(steps) == 4 and _finite(clean4)

  with caplog.at_level(logging.WARNING):
    skipped = loop.train_and_evaluate(
        _config(num_train_steps=5, nonfinite='skip'),
        str(tmp_path / 'skip')).state
  assert 'step 5: loss or gradient not finite; the step was skipped' in (
      caplog.text)
  assert int(skipped.step) == 5 and _finite(skipped)
  _assert_same_params(skipped, clean4, 61)
  # The optimizer's momentum is step 4's; its count (the schedule's step)
  # moved on with the skipped batch.
  assert int(optax.tree_utils.tree_get(skipped.opt_state, 'count')) == 5
  for a, b in zip(jax.tree.leaves(jax.device_get(optax.tree_utils.tree_set(
      skipped.opt_state, count=clean4.step))),
                  jax.tree.leaves(jax.device_get(clean4.opt_state))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_after_skipped_steps_the_applied_learning_rate_is_the_logged_one():
  """Two skipped steps, then one applied, with a learning rate that rises
  every step (warm-up): the optimizer applies schedule(state.step), the
  rate logged, measured from plain SGD's update (-lr * gradient). It used
  to apply the rate of two steps earlier (optax's count stayed behind)."""
  c = _config(momentum=0.0, weight_decay=0.0, learning_rate=0.1,
              warmup_epochs=1.0, nonfinite='skip')  # 4 steps of warm-up
  mesh = arrays.make_mesh(1, jax.devices()[:1])
  data = data_source.open_data(c, mesh)
  task = setup.make_task(c, mesh, data)
  state = setup.init_state(task)
  step = train_step.make_train_step(
      task, setup.state_shardings(task, state))
  stream = data.open(None)
  for skip in (True, True, False):
    batch = next(stream)
    if skip:
      batch = dict(batch, image=batch['image'] * jnp.nan)
    before = jax.device_get(state.params)
    state, metrics = step(state, batch)
    assert float(metrics['nonfinite']) == float(skip)
  change = jax.tree.map(np.subtract, jax.device_get(state.params), before)
  applied = float(optax.tree.norm(change)) / float(metrics['grad_norm'])
  np.testing.assert_allclose(float(metrics['learning_rate']),
                             float(task.schedule(2)), rtol=1e-6)
  np.testing.assert_allclose(applied, float(metrics['learning_rate']),
                             rtol=1e-3)
  assert int(state.step) == 3
  assert int(optax.tree_utils.tree_get(state.opt_state, 'count')) == 3


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path,
                                                              caplog):
  """Step 4's checkpoint has its array data overwritten and a save of step
  5 was cut short: the rerun warns, moves step 4 aside, resumes from step 2
  and ends on the uninterrupted run's parameters."""
  c = _config(num_train_steps=4, checkpoint_every_steps=2)
  full = loop.train_and_evaluate(c, str(tmp_path)).state
  step4 = tmp_path / 'checkpoints' / '4'
  data = [os.path.join(d, f) for d, _, files in os.walk(step4 / 'state')
          for f in files if os.sep + 'd' + os.sep in os.path.join(d, f)]
  assert data, sorted(os.walk(step4))
  for path in data:
    with open(path, 'r+b') as f:
      size = f.seek(0, os.SEEK_END)
      f.seek(0)
      f.write(np.random.default_rng(0).bytes(size))
  half = tmp_path / 'checkpoints' / '5.orbax-checkpoint-tmp-1234'
  (half / 'state').mkdir(parents=True)

  with caplog.at_level(logging.WARNING):
    resumed = loop.train_and_evaluate(c, str(tmp_path))
  assert 'checkpoint' in caplog.text and 'cannot be read' in caplog.text
  assert 'trying the one before it' in caplog.text
  aside = [n for n in os.listdir(tmp_path / 'checkpoints')
           if n.startswith('corrupt-4-')]
  assert len(aside) == 1  # kept for inspection, not deleted
  assert not half.exists()
  assert int(resumed.state.step) == 4
  _assert_same_params(resumed.state, full, 61)


def test_checkpoint_write_error_is_clear_and_keeps_earlier_ones(
    tmp_path, monkeypatch):
  real_save = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
  c = _config(num_train_steps=4, checkpoint_every_steps=2)
  with pytest.raises(checkpoint.CheckpointWriteError,
                     match=r'step 4\) .* No space left on device\. The '
                           r'checkpoints already there \(\[1, 2\]\) are '
                           r'intact; .*resume from step 2'):
    loop.train_and_evaluate(c, str(tmp_path))
  (state, _, step), steps = _restore(tmp_path, c)
  assert step == 2 and steps == [1, 2] and _finite(state)
