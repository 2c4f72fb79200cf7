"""The heads after the paper through the trainer: each takes the same steps
on the full and the chunked loss, trains class-sharded over 8 devices
(with Partial FC), resumes exactly, and a head that draws at random resumes
after kill -9 drawing what the uninterrupted run drew. (Their math against
float64 references: test_recent_heads.py.)"""

import signal

import jax
import numpy as np
import pytest

from npcface_jax import models
from npcface_jax.common import arrays
from npcface_jax.loss import registry
from npcface_jax.training import config_checks, loop
from tests import tiny_backbone
from tests.helpers import fresh_rng
from tests.test_train import (TINY, _assert_same_params, _config, _latest_step,
                              _run_steps, _run_until)

RECENT = ['adaface', 'magface', 'elasticface_arc', 'elasticface_cos',
          'elasticface_arc_plus', 'elasticface_cos_plus', 'sphereface2',
          'uniface']


def _close(a, b, rtol=1e-4, atol=2e-5, msg=''):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      x, y, rtol=rtol, atol=atol, err_msg=msg), jax.device_get(a),
      jax.device_get(b))


@pytest.mark.slow
@pytest.mark.parametrize('head', RECENT)
def test_full_chunked_and_class_sharded(head):
  """One device: the full logits and the chunked loss take the same three
  steps (parameters, head parameters and state, per-step metrics). Eight
  devices, the classes over two: finite steps that lower the loss, and,
  where the batch stays whole on every class shard (the head keeps a
  statistic of the batch) or draws nothing, the one device's steps."""
  c = _config(head=head, learning_rate=0.01, chunk_size=0)
  one = arrays.make_mesh(1, jax.devices()[:1])
  full, h_full = _run_steps(c, one, 3, tiny=True)
  c.chunk_size = 16
  chunked, h_chunked = _run_steps(c, one, 3, tiny=True)
  _assert_same_params(chunked, full, 61, rtol=1e-4, atol=2e-5)
  _close(chunked.params['head'], full.params['head'], msg=head)
  _close(chunked.head_state, full.head_state, msg=head)
  for m_c, m_f in zip(h_chunked, h_full):
    for k in m_f:
      if k != 'hard_samples':
        np.testing.assert_allclose(m_c[k], m_f[k], rtol=1e-4, atol=1e-5,
                                   err_msg=f'{head} {k}')
  c.model_parallel = 2
  sharded, h_sharded = _run_steps(c, arrays.make_mesh(2), 3, tiny=True)
  assert all(np.isfinite(m['loss']) for m in h_sharded), head
  draws_per_shard = (head.startswith('elasticface')
                     and not head.endswith('plus'))
  if not draws_per_shard:  # the same computation, laid out otherwise
    _assert_same_params(sharded, full, 61, rtol=1e-4, atol=2e-5)
    _close(sharded.head_state, full.head_state, msg=head)


@pytest.mark.slow
@pytest.mark.parametrize('head', ['sphereface2', 'magface'])
def test_partial_fc_and_the_default_block(head):
  """Partial FC over 2 class shards with a learnt bias or norm gradients,
  and config.chunk_size=-1 (the default): chunked for every head that has
  parts, the full logits for the two that have none."""
  c = _config(head=head, model_parallel=2, sample_rate=0.5)
  state, history = _run_steps(c, arrays.make_mesh(2), 3, tiny=True)
  assert all(np.isfinite(m['loss']) for m in history), head
  assert config_checks.chunk_size(c, registry.get_head(head)) == (
      config_checks.DEFAULT_CHUNK)
  for name in ('adacos', 'adam_softmax'):
    assert config_checks.chunk_size(
        c, registry.get_head(name)) is None


def test_focal_with_a_one_vs_all_head_is_refused():
  c = _config(head='uniface', criterion='focal')
  with pytest.raises(config_checks.ConfigError,
                     match="head 'uniface' is its own one-vs-all criterion"):
    config_checks.check(c, num_devices=1, process_count=1)


@pytest.mark.slow(minutes=1)
def test_drawn_margins_resume_after_kill9(tmp_path, monkeypatch):
  """ElasticFace draws its margins from the seed and the step: a run killed
  with SIGKILL and restarted ends on the uninterrupted run's parameters;
  AdaFace's running statistics come back from the checkpoint the same
  way (SIGTERM-free: restarted from its newest checkpoint)."""
  monkeypatch.setattr(models, 'from_config', tiny_backbone.create_model)
  overrides = {**TINY, 'head': 'elasticface_arc', 'model_parallel': 2,
               'num_train_steps': 48, 'log_every_steps': 1,
               'checkpoint_every_steps': 8}
  c = _config(**overrides)
  full = loop.train_and_evaluate(c, str(tmp_path / 'full')).state
  rng, seed = fresh_rng()
  kill_at = int(rng.integers(10, 33))
  workdir = tmp_path / 'killed'
  status, log = _run_until(workdir, overrides, kill_at, signal.SIGKILL)
  assert status == -signal.SIGKILL, (seed, log[-3000:])
  assert _latest_step(workdir) < 48, (seed, kill_at)
  resumed = loop.train_and_evaluate(c, str(workdir))
  assert int(resumed.state.step) == 48, (seed, kill_at)
  _assert_same_params(resumed.state, full, 61)


@pytest.mark.slow
@pytest.mark.parametrize('head', ['adaface', 'sphereface2'])
def test_state_and_params_resume(tmp_path, monkeypatch, head):
  """A run stopped at step 8 (its checkpoint) and continued to 16 ends on
  the 16-step run's parameters, head parameters and head state."""
  monkeypatch.setattr(models, 'from_config', tiny_backbone.create_model)
  overrides = {'head': head, 'checkpoint_every_steps': 8}
  whole = loop.train_and_evaluate(
      _config(**overrides, num_train_steps=16), str(tmp_path / 'whole')).state
  loop.train_and_evaluate(_config(**overrides, num_train_steps=8),
                          str(tmp_path / 'split'))
  resumed = loop.train_and_evaluate(_config(**overrides, num_train_steps=16),
                                    str(tmp_path / 'split')).state
  assert int(resumed.step) == 16
  _assert_same_params(resumed, whole, 61)
  _close(resumed.params['head'], whole.params['head'], rtol=0, atol=0)
  _close(resumed.head_state, whole.head_state, rtol=0, atol=0)
