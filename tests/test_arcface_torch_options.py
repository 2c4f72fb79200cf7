"""The options that make this trainer's step arcface_torch's (benchmarks/
torch_parity.py shows the two equal step for step): each one does what it
says, without torch, and each defaults to this trainer's own behaviour."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from npcface_jax.common import arrays
from npcface_jax.loss import heads, registry
from npcface_jax.models import layers
from npcface_jax.training import config_checks, data_source, setup


def test_arcface_straight_through_has_the_margins_value_and_cosines_grad():
  c = jnp.array([0.9, 0.3, -0.2, -0.7])
  exact = heads.arc_positive(c, 0.5, monotone=False)
  st = heads.arc_positive(c, 0.5, monotone=False, straight_through=True)
  np.testing.assert_allclose(st, np.cos(np.arccos(np.float64(c)) + 0.5),
                             atol=2e-7)
  np.testing.assert_allclose(st, exact, atol=2e-7)
  grad = jax.grad(lambda x: jnp.sum(heads.arc_positive(
      x, 0.5, monotone=False, straight_through=True)))(c)
  np.testing.assert_array_equal(grad, np.ones(4))
  own = jax.grad(lambda x: jnp.sum(heads.arc_positive(x, 0.5)))(c)
  assert not np.allclose(own, 1.0)  # the default: the margin's gradient


def test_arcface_monotone_off_lets_the_angle_wrap_past_pi():
  c = jnp.array([-0.95])  # theta + 0.5 > pi
  wrapped = float(np.cos(np.arccos(-0.95) + 0.5))
  fallback = -0.95 - 0.5 * math.sin(0.5)
  for st in (False, True):
    np.testing.assert_allclose(heads.arc_positive(
        c, 0.5, monotone=False, straight_through=st), [wrapped], atol=1e-6)
    np.testing.assert_allclose(heads.arc_positive(
        c, 0.5, straight_through=st), [fallback], atol=1e-6)
  head = registry.get_head('arcface')
  assert head.monotone and not head.straight_through


def test_arcface_options_reach_the_full_and_the_chunked_loss():
  head = registry.get_head('arcface', monotone=False, straight_through=True)
  cos = jnp.array([[0.2, -0.96, 0.1], [0.4, 0.3, -0.1]])
  labels = jnp.array([1, 0])
  logits = heads.arcface_logits(cos, labels, monotone=False,
                                straight_through=True)
  want = 64 * np.cos(np.arccos(np.array([-0.96, 0.4])) + 0.5)
  np.testing.assert_allclose(logits[jnp.arange(2), labels], want, rtol=1e-5)
  positive = head.parts().positive(cos[jnp.arange(2), labels], None, None)
  np.testing.assert_allclose(positive, want, rtol=1e-5)


def test_softmax_min_prob_caps_the_loss_value_not_its_gradient():
  plain = registry.get_criterion('softmax')
  capped = registry.get_criterion('softmax', min_prob=1e-30)
  assert plain.options == {'min_prob': 0.0}
  ce = jnp.array([1.0, 80.0])
  np.testing.assert_allclose(plain.reduce(ce), 40.5)
  np.testing.assert_allclose(capped.reduce(ce),
                             (1.0 - math.log(1e-30)) / 2, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(capped.reduce)(ce), [0.5, 0.5])


def _tree(backbone, classifier):
  return {'backbone': {'w': jnp.asarray(backbone, jnp.float32)},
          'classifier': jnp.asarray(classifier, jnp.float32), 'head': {}}


def test_grad_clip_scope_backbone_clips_the_backbones_norm_alone():
  grads = _tree([30.0, 40.0], [[100.0, 0.0]])
  tx = setup.clip_by_global_norm_of(5.0, 'backbone')
  out, _ = tx.update(grads, tx.init(grads))
  # PyTorch's clip_grad_norm_: times 5 / (50 + 1e-6).
  np.testing.assert_allclose(out['backbone']['w'], [3.0, 4.0], rtol=1e-6)
  np.testing.assert_array_equal(out['classifier'], grads['classifier'])
  small = _tree([0.3, 0.4], [[100.0, 0.0]])
  out, _ = tx.update(small, tx.init(small))
  np.testing.assert_array_equal(out['backbone']['w'], small['backbone']['w'])
  everything, _ = setup.clip_by_global_norm_of(5.0, 'all').update(
      grads, optax.EmptyState())
  assert abs(float(optax.tree.norm(everything)) - 5.0) < 1e-5
  with pytest.raises(ValueError, match='grad_clip_scope'):
    setup.clip_by_global_norm_of(5.0, 'classifier')


def _optimizer(**fields):
  c = default.get_config()
  c.update(fields)
  return setup.create_optimizer(c, 100)[0]


def test_frozen_params_get_no_update_no_decay_and_stay_out_of_the_norm():
  params = {'backbone': {'a': jnp.ones(2), 'scale': jnp.ones(2)},
            'classifier': jnp.ones((1, 2)), 'head': {}}
  grads = jax.tree.map(lambda x: 3.0 * x, params)
  tx = _optimizer(frozen_params='backbone/scale$', grad_clip_norm=1.0)
  state = tx.init(params)
  for _ in range(2):  # momentum too
    updates, state = tx.update(grads, state, params)
  np.testing.assert_array_equal(updates['backbone']['scale'], 0.0)
  assert np.all(np.asarray(updates['backbone']['a']) < 0)
  # The clipped norm is over the trained parameters alone (2 + 2 entries
  # of 3: norm 6 -> times 1/6), so each is -lr (0.1) * (1/2 + decay).
  first = -0.1 * (0.5 + 5e-4)
  np.testing.assert_allclose(updates['classifier'], first * 1.9, rtol=1e-5)
  unfrozen, _ = _optimizer().update(grads, _optimizer().init(params), params)
  assert np.all(np.asarray(unfrozen['backbone']['scale']) < 0)
  with pytest.raises(config_checks.ConfigError, match='matches no parameter'):
    _optimizer(frozen_params='nothing_like_this').init(params)
  c = default.get_config()
  c.frozen_params = '(unclosed'
  with pytest.raises(config_checks.ConfigError, match='frozen_params'):
    config_checks.check(c, num_devices=1)


def _classifier(std):
  c = default.get_config()
  c.model, c.embedding_dim = 'resnet50', 16
  c.model_options.units, c.model_options.width = [1, 1, 1, 1], 0.125
  c.head, c.batch_size, c.classifier_init_std = 'arcface', 8, std
  task = setup.make_task(c, arrays.make_mesh(1),
                         data_source.Data(40, 112, 10, None))
  shapes = jax.eval_shape(lambda k: setup._init_state(task, k),  # noqa: SLF001
                          jax.random.key(0))
  assert shapes.params['classifier'].shape == (40, 16)
  return np.asarray(setup._init_state(task, jax.random.key(0))  # noqa: SLF001
                    .params['classifier'])


def test_classifier_init_std_draws_normal_rows_default_unit_rows():
  np.testing.assert_allclose(np.linalg.norm(_classifier(0.0), axis=1), 1.0,
                             rtol=1e-5)
  w = _classifier(0.01)
  assert 0.008 < w.std() < 0.012 and abs(w.mean()) < 0.002


@pytest.mark.parametrize('unbiased', [False, True])
def test_unbiased_running_var_as_torch_keeps_it(unbiased):
  x = jax.random.normal(jax.random.key(1), (4, 3, 3, 5)) * 2.0 + 1.0
  bn = layers.BatchNorm(True, unbiased_running_var=unbiased)
  variables = bn.init(jax.random.key(0), x)
  y, new = bn.apply(variables, x, mutable=['batch_stats'])
  flat = np.asarray(x, np.float64).reshape(-1, 5)
  want = 0.9 + 0.1 * flat.var(axis=0, ddof=1 if unbiased else 0)
  np.testing.assert_allclose(new['batch_stats']['var'], want, rtol=1e-5)
  # Normalisation itself uses the biased variance either way.
  np.testing.assert_allclose(
      np.asarray(y).reshape(-1, 5).std(axis=0), 1.0, rtol=1e-4)
