"""Random cosine matrices for the head tests: fresh each run (the seed is in
every failure message), covering the cases the heads must get right."""

import pathlib

import numpy as np

# The shared real-face test data (never copied into the repository).
SHARED_DATA = (pathlib.Path(__file__).resolve().parents[1].parent / 'shared'
               / 'data')


def fresh_rng():
  seed = int(np.random.SeedSequence().entropy % 2**32)
  return np.random.default_rng(seed), seed


def cosines(rng, batch=12, num_classes=20, kinds=None):
  """(cos float64 (B, C), labels (B,)) with one row per case in ``kinds``,
  cycled: 'real' (training-like), 'near_pos1' / 'near_neg1' (target close to
  +-1), 'wrap' (theta_y + m > pi), 'easy' (no hard negatives), 'hard' (many)."""
  kinds = kinds or ['real', 'near_pos1', 'near_neg1', 'wrap', 'easy', 'hard']
  labels = rng.integers(0, num_classes, batch)
  cos = np.empty((batch, num_classes))
  for i in range(batch):
    kind = kinds[i % len(kinds)]
    neg = np.clip(rng.normal(0.0, 0.2, num_classes), -0.95, 0.95)
    target = {
        'real': lambda: rng.uniform(0.1, 0.8),
        'near_pos1': lambda: 1.0 - rng.uniform(1e-4, 1e-3),
        'near_neg1': lambda: -1.0 + rng.uniform(1e-4, 1e-3),
        'wrap': lambda: rng.uniform(-0.97, -0.93),
        'easy': lambda: rng.uniform(0.92, 0.97),
        'hard': lambda: rng.uniform(-0.5, -0.2),
    }[kind]()
    if kind == 'easy':
      neg = rng.uniform(-0.4, 0.3, num_classes)
    cos[i] = neg
    cos[i, labels[i]] = target
  return cos, labels


def away_from(values, thresholds, gap=1e-4):
  """True where no value lies within ``gap`` of its row's threshold, so that
  float32 and float64 agree on which side each one falls."""
  return bool(np.all(np.abs(values - thresholds[:, None]) > gap))


def assert_same_step(got, want, msg, loss_rtol=1e-5):
  """Two ``value_and_grad(..., has_aux=True)`` results of a classifier loss
  agree: loss, gradients (rtol 1e-5, atol relative to the largest entry),
  and the head's new state and metrics."""
  import jax  # noqa: PLC0415 (helpers stay importable without a backend)
  ((l1, out1), g1), ((l0, out0), g0) = got, want
  np.testing.assert_allclose(l1, l0, rtol=loss_rtol, err_msg=msg)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5,
                               atol=1e-5 * float(np.max(np.abs(b))),
                               err_msg=msg)
  jax.tree.map(lambda a, b: _assert_close(a, b, msg),
               (out1.state, out1.metrics), (out0.state, out0.metrics))


def _assert_close(a, b, msg):
  a, b = np.asarray(a), np.asarray(b)
  if np.issubdtype(b.dtype, np.floating):
    # atol: cosines near 0 (cos_target, cos_nearest) come from different
    # float32 sums on the two paths
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=msg)
  else:  # counts and flags (top1) agree exactly
    np.testing.assert_array_equal(a, b, err_msg=msg)


def orl_faces():
  """The shared ORL photos' folder, read in place (never copied into the
  repository); skips the test, saying why, where it is absent."""
  import pytest  # noqa: PLC0415
  faces = SHARED_DATA / 'orl_faces'
  if not faces.is_dir():
    pytest.skip(f'ORL faces not found at {faces} (shared test data absent)')
  return faces


def orl_people(tmp_path, people):
  """A folder of ORL identities s<p> (symlinks into the shared data), for
  data_prep; skips the test, saying why, where the data is absent."""
  faces = orl_faces()
  src = tmp_path / 'orl_src'
  src.mkdir()
  for p in people:
    (src / f's{p}').symlink_to(faces / f's{p}')
  return src


def random_variables(model, image_shape, seed=0):
  """A backbone's variables drawn in NumPy from flax's initial
  distributions (convolutions He-normal, dense layers LeCun-normal, BN
  scale 1 and statistics (0, 1), biases 0, PReLU 0.25): the shapes come
  from jax.eval_shape, so nothing is compiled, where a jitted init of a
  deep backbone takes 15-20 s on this CPU."""
  import jax  # noqa: PLC0415 (this module serves NumPy-only tests too)
  import jax.numpy as jnp  # noqa: PLC0415 (as above)
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct(image_shape, jnp.float32))

  def draw(path, leaf):
    name, shape = jax.tree_util.keystr(path), leaf.shape
    if "'var'" in name or "'scale'" in name:
      return np.ones(shape, np.float32)
    if "'alpha'" in name:
      return np.full(shape, 0.25, np.float32)
    if "'kernel'" in name:
      gain = 2.0 if len(shape) == 4 else 1.0
      std = np.sqrt(gain / np.prod(shape[:-1]))
      return (rng.standard_normal(shape) * std).astype(np.float32)
    return np.zeros(shape, np.float32)  # biases, BN offsets and means

  return jax.tree_util.tree_map_with_path(draw, shapes)
