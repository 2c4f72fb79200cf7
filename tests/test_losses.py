"""Criteria against float64 references, and the registry's contract."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import npcface_jax as nf
from npcface_jax.loss import criteria, heads, registry
from tests import np_reference as ref
from tests.helpers import cosines, fresh_rng

CRITERIA = {
    'softmax': (lambda z, y: nf.softmax_cross_entropy(z, y),
                lambda z, y: np.mean(ref.cross_entropy(z, y))),
    'focal': (lambda z, y: nf.focal_loss(z, y), ref.focal),
    'focal_half': (lambda z, y: nf.focal_loss(z, y, gamma=0.5),
                   lambda z, y: ref.focal(z, y, gamma=0.5)),
    'ohem': (lambda z, y: nf.ohem_loss(z, y), ref.ohem),
    'ohem_quarter': (lambda z, y: nf.ohem_loss(z, y, keep_fraction=0.25),
                     lambda z, y: ref.ohem(z, y, keep_fraction=0.25)),
}


def _logits(rng, batch=10, num_classes=12):
  return rng.normal(0.0, 3.0, (batch, num_classes)), rng.integers(
      0, num_classes, batch)


@pytest.mark.parametrize('name', sorted(CRITERIA))
def test_value_and_gradient_match_reference(name):
  rng, seed = fresh_rng()
  z, y = _logits(rng)
  fn, ref_fn = CRITERIA[name]
  value, grad = jax.value_and_grad(fn)(jnp.float32(z), y)
  np.testing.assert_allclose(value, ref_fn(z, y), rtol=1e-5,
                             err_msg=f'seed {seed}')
  np.testing.assert_allclose(
      grad, ref.central_difference(lambda v: ref_fn(v, y), z, h=1e-5),
      rtol=1e-3, atol=1e-5, err_msg=f'seed {seed}')


def test_cross_entropy_is_stable_for_large_logits():
  z = jnp.array([[1000.0, -1000.0, 999.0], [-5e4, 5e4, 0.0]])
  y = np.array([0, 0])
  ce = criteria.per_sample_cross_entropy(z, y)
  np.testing.assert_allclose(ce, ref.cross_entropy(np.asarray(z), y), rtol=1e-6)


def test_padding_columns_drop_out():
  """-inf logits (the heads' padding classes) and num_classes both exclude
  columns from the softmax, with zero gradient there."""
  rng, seed = fresh_rng()
  z, y = _logits(rng, num_classes=8)
  y = y % 5
  full = nf.softmax_cross_entropy(jnp.float32(z[:, :5]), y)
  masked = jnp.float32(z).at[:, 5:].set(-jnp.inf)
  np.testing.assert_allclose(nf.softmax_cross_entropy(masked, y), full,
                             rtol=1e-6)
  np.testing.assert_allclose(
      nf.softmax_cross_entropy(jnp.float32(z), y, num_classes=5), full,
      rtol=1e-6)
  grad = jax.grad(lambda v: nf.focal_loss(v, y, num_classes=5))(jnp.float32(z))
  assert np.all(np.isfinite(grad)) and np.all(grad[:, 5:] == 0), seed


def test_focal_with_gamma_zero_is_cross_entropy():
  rng, _ = fresh_rng()
  z, y = _logits(rng)
  np.testing.assert_allclose(nf.focal_loss(jnp.float32(z), y, gamma=0.0),
                             nf.softmax_cross_entropy(jnp.float32(z), y),
                             rtol=1e-6)


def test_focal_gradient_finite_when_confident():
  z = jnp.array([[80.0, 0.0, 0.0]])
  grad = jax.grad(lambda v: nf.focal_loss(v, np.array([0]), gamma=0.5))(z)
  assert np.all(np.isfinite(grad))


def test_ohem_rejects_bad_fraction():
  with pytest.raises(ValueError, match='keep_fraction'):
    nf.ohem_loss(jnp.zeros((4, 3)), np.zeros(4, int), keep_fraction=0.0)


@pytest.mark.parametrize('name', registry.head_names())
def test_registry_heads_match_direct_calls(name):
  rng, seed = fresh_rng()
  cos, labels = cosines(rng, num_classes=16)
  c = jnp.float32(cos)
  head = nf.get_head(name)
  state = head.init_state(16)
  params = head.init_params(jax.random.key(1), 16)
  norms, key = jnp.float32(rng.uniform(5.0, 50.0, len(labels))), (
      jax.random.key(seed))
  given = nf.Given(norms=norms if 'norms' in head.needs else None,
                   key=key if 'key' in head.needs else None)
  out = jax.jit(lambda c, y, s, p: head(c, y, s, p, given=given))(
      c, labels, state, params)
  direct = {
      'sphereface': lambda: nf.sphereface_logits(c, labels, state),
      'adacos': lambda: nf.adacos_logits(c, labels, state),
      'curricularface': lambda: nf.curricularface_logits(c, labels, state),
      'adam_softmax': lambda: nf.adam_softmax_logits(c, labels,
                                                     params['margins']),
      'npcface': lambda: nf.npcface_logits(c, labels, return_diagnostics=True),
      'adaface': lambda: nf.adaface_logits(c, labels, norms, state),
      'magface': lambda: nf.magface_logits(c, labels, norms),
      'sphereface2': lambda: (nf.sphereface2_logits(
          c, labels, params['bias']), None),
      'uniface': lambda: (nf.uniface_logits(c, labels, params['bias']), None),
      **{f'elasticface_{v}': functools.partial(
          nf.elasticface_logits, c, labels, key, variant=v)
         for v in ('arc', 'cos', 'arc_plus', 'cos_plus')},
  }.get(name, lambda: (getattr(heads, {'am_softmax': 'cosface'}.get(
      name, name) + '_logits')(c, labels), None))()
  # jit may fuse differently from eager: equal to float32 rounding.
  np.testing.assert_allclose(out.logits, direct[0], rtol=1e-5, atol=1e-4,
                             err_msg=str(seed))
  if name in ('sphereface', 'adacos', 'curricularface', 'adaface'):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
                 out.state, direct[1])
  if name == 'adam_softmax':
    np.testing.assert_allclose(out.aux_loss, direct[1], rtol=1e-6)
  if name == 'npcface':
    np.testing.assert_array_equal(out.metrics['num_hard'],
                                  direct[1]['num_hard'])


def test_registry_options_and_presets():
  head = nf.get_head('npcface', preset='facex_zoo', m1=0.3)
  assert head.options['scale'] == 32.0 and head.options['m1'] == 0.3
  assert head.options['easy_margin'] is True
  with pytest.raises(ValueError, match="no option.*'margn'.*margin"):
    nf.get_head('arcface', margn=0.5)
  with pytest.raises(ValueError, match='unknown head .*arcfce'):
    nf.get_head('arcfce')
  with pytest.raises(ValueError, match='unknown NPCFace preset'):
    nf.get_head('npcface', preset='papr')
  with pytest.raises(ValueError, match='unknown criterion'):
    nf.get_criterion('hinge')
  with pytest.raises(ValueError, match=r"softmax' has no option.*gamma"):
    nf.get_criterion('softmax', gamma=2.0)
  crit = nf.get_criterion('ohem', keep_fraction=0.5)
  ce = jnp.array([1.0, 4.0, 2.0, 3.0])
  np.testing.assert_allclose(crit.reduce(ce), 3.5)


def test_heads_say_what_the_trainer_must_do_with_them():
  """The trainer names no head: AdaM-softmax's projection and per-class
  margins, NPCFace's diagnostics and a stateful head's scalar state all
  come from the head object (heads.Head)."""
  rng, seed = fresh_rng()
  cos, labels = cosines(rng, batch=12, num_classes=20)
  cos, labels = jnp.asarray(cos, jnp.float32), jnp.asarray(labels)
  adam = registry.get_head('adam_softmax')
  assert adam.per_class_params == {'margins'}
  projected = adam.project({'margins': jnp.array([-0.5, 0.3, 1.7])})
  np.testing.assert_allclose(projected['margins'], [0.0, 0.3, 1.0])
  for name in registry.head_names():
    if name != 'adam_softmax':
      head = registry.get_head(name)
      assert head.per_class_params == frozenset(), name
      assert head.project({}) == {}, name
  npc = registry.get_head('npcface')
  out = npc(cos, labels)
  found = npc.diagnostics(out)
  hard = np.asarray(out.metrics['num_hard'], np.float64)
  np.testing.assert_allclose(found['npcface/hard_share'], np.mean(hard > 0),
                             err_msg=f'seed {seed}')
  np.testing.assert_allclose(found['npcface/hard_count'], hard.mean(),
                             rtol=1e-6, err_msg=f'seed {seed}')
  np.testing.assert_allclose(found['npcface/margin'],
                             np.mean(out.metrics['margin']), rtol=1e-6)
  assert set(found) == {'npcface/hard_share', 'npcface/hard_count',
                        'npcface/margin'}
  adacos = registry.get_head('adacos')
  out = adacos(cos, labels, adacos.init_state(20))
  assert set(adacos.diagnostics(out)) == {'head/scale'}
  assert registry.get_head('arcface').diagnostics(
      registry.get_head('arcface')(cos, labels)) == {}
