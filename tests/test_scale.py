"""A million classes on eight fake devices, and Partial FC in the trainer's
step. The tests' small backbone (tests/tiny_backbone.py) keeps compiles
short; the classifier (1,000,000 x 512, rows split over all eight devices)
is the real one."""

import jax
import numpy as np
import pytest

from npcface_jax.common import arrays
from npcface_jax.training import setup, train_step
from tests.test_train import _config, _task

# A million classes on eight devices: the full suite only.
pytestmark = pytest.mark.slow(minutes=1)


def _classifier_bytes_per_device(state) -> tuple[dict, int]:
  """Bytes of the classifier and its optimizer state held by each device,
  and in all."""
  out = {}
  leaves = [state.params['classifier']] + [
      leaf for path, leaf in jax.tree_util.tree_leaves_with_path(
          state.opt_state)
      if 'classifier' in jax.tree_util.keystr(path)]
  for leaf in leaves:
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out, sum(leaf.nbytes for leaf in leaves)


def test_a_million_classes_train_a_step():
  """C = 1,000,000, D = 512 over 8 devices: one step of NPCFace (the fused
  chunked loss) trains within this machine's memory; each device holds
  1/8 of the classifier and of its momentum, and the step gives every
  class's row a gradient (softmax over all classes; one row in 9,973
  checked)."""
  c = _config(**{'synthetic.num_classes': 1_000_000, 'embedding_dim': 512,
                 'model_parallel': 8, 'chunk_size': 16_384})
  mesh = arrays.make_mesh(8)
  data, task = _task(c, mesh, tiny=True)
  state = setup.init_state(task)
  per_device, total = _classifier_bytes_per_device(state)
  assert total == 2 * 1_000_000 * 512 * 4  # weights + momentum, float32
  assert sorted(per_device.values()) == [total // 8] * 8, per_device
  before = np.asarray(state.params['classifier'][::9973])
  step = train_step.make_train_step(
      task, setup.state_shardings(task, state))
  state, metrics = step(state, next(data.open(None)))
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics['loss']) and metrics['nonfinite'] == 0
  after = np.asarray(state.params['classifier'][::9973])
  decayed = before - np.float32(c.learning_rate) * (
      np.float32(c.weight_decay) * before)
  moved = np.abs(after - decayed).max(axis=1) > 1e-9
  assert moved.all(), f'{(~moved).sum()} of {moved.size} rows did not move'


def test_partial_fc_step_moves_only_sampled_rows():
  """sample_rate 0.5 over 8 'model' shards of 50 rows: exactly 8 x 25
  rows get a gradient, every target among them; all other rows move by
  weight decay alone, bit for bit the optimizer's arithmetic."""
  c = _config(**{'synthetic.num_classes': 400, 'model_parallel': 8,
                 'sample_rate': 0.5})
  mesh = arrays.make_mesh(8)
  data, task = _task(c, mesh, tiny=True)
  assert task.num_sample == 25
  state = setup.init_state(task)
  before = np.asarray(state.params['classifier'])
  step = train_step.make_train_step(
      task, setup.state_shardings(task, state))
  batch = next(data.open(None))
  labels = np.asarray(batch['label'])
  state, metrics = step(state, batch)
  after = np.asarray(state.params['classifier'])
  lr, wd = np.float32(c.learning_rate), np.float32(c.weight_decay)
  decayed = before - lr * (wd * before)
  moved = np.abs(after - decayed).max(axis=1) > 1e-9
  assert moved.sum() == 8 * 25, moved.sum()
  assert moved[labels].all()
  np.testing.assert_allclose(after[~moved], decayed[~moved], rtol=1e-6)
  assert np.isfinite(jax.device_get(metrics['loss']))
