"""class_shards against a plain NumPy statement of the rule: shard k of S
owns classes k*R .. k*R + R - 1 (R = ceil(C / S)), classes from C on are
padding; over 1, 2 and 4 shards (in shard_map, from lax.axis_index, and
with the shard index given), for class counts S does and does not
divide."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from npcface_jax.loss import class_shards
from tests.helpers import fresh_rng

B = 12


def _mesh(num_shards):
  return jax.make_mesh((num_shards,), ('model',),
                       devices=jax.devices()[:num_shards],
                       axis_types=(jax.sharding.AxisType.Auto,))


def _reference(labels, num_classes, num_shards):
  """Per shard: (class ids, is_target, local target, owned, real)."""
  rows = -(-num_classes // num_shards)
  out = []
  for k in range(num_shards):
    ids = k * rows + np.arange(rows)
    owned = labels // rows == k
    local = np.clip(labels - k * rows, 0, rows - 1)  # in range where not owned
    out.append((ids, ids[None, :] == labels[:, None], local, owned,
                ids < num_classes))
  return rows, out


def test_padded_num_classes_and_rows():
  for c, s, padded in ((61, 8, 64), (64, 8, 64), (7, 4, 8), (5, 1, 5),
                       (1_000_000, 8, 1_000_000), (3, 4, 4)):
    assert class_shards.padded_num_classes(c, s) == padded
    assert class_shards.rows_per_shard(c, s) == padded // s


@pytest.mark.parametrize('num_shards', [1, 2, 4])
@pytest.mark.parametrize('num_classes', [8, 13])
def test_columns_in_shard_map(num_shards, num_classes):
  rng, seed = fresh_rng()
  labels = rng.integers(0, num_classes, B)
  rows, want = _reference(labels, num_classes, num_shards)
  x = rng.normal(size=(B, rows * num_shards)).astype(np.float32)
  mesh = _mesh(num_shards)

  def local(x, labels):
    cols = class_shards.columns(labels, rows, 'model', num_classes)
    ids = class_shards.class_ids(class_shards.shard_index('model'), rows)
    negatives = class_shards.negatives(cols.is_target, cols.valid)
    return (ids, cols.is_target, cols.local_label[:, None],
            cols.owned[:, None], cols.valid, negatives,
            class_shards.take_target(x, cols, 'model'))

  split = jax.P(None, 'model')
  got = jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(split, jax.P()),
      out_specs=(split,) * 6 + (jax.P(),)))(x, labels)
  ids, is_target, local_label, owned, valid, negatives, target = map(
      np.asarray, got)
  msg = f'{num_shards} shards, C={num_classes}, seed {seed}'
  np.testing.assert_array_equal(ids[0], np.concatenate([w[0] for w in want]),
                                msg)
  np.testing.assert_array_equal(
      is_target, np.concatenate([w[1] for w in want], axis=1), msg)
  np.testing.assert_array_equal(local_label, np.stack([w[2] for w in want], 1),
                                msg)
  np.testing.assert_array_equal(owned, np.stack([w[3] for w in want], 1), msg)
  real = np.concatenate([w[4] for w in want])
  np.testing.assert_array_equal(valid[0], real, msg)
  np.testing.assert_array_equal(negatives, ~is_target & real[None, :], msg)
  assert owned.sum(axis=1).tolist() == [1] * B, msg  # one owner per label
  np.testing.assert_array_equal(target, x[np.arange(B), labels], msg)


@pytest.mark.parametrize('num_shards', [1, 2, 4])
@pytest.mark.parametrize('num_classes', [8, 13])
def test_explicit_shard_and_blocks(num_shards, num_classes):
  """The shard index given (Partial FC's sampling takes it so), and blocks
  of a shard's rows (the chunked loss's), against the same reference."""
  rng, seed = fresh_rng()
  labels = rng.integers(0, num_classes, B)
  rows, want = _reference(labels, num_classes, num_shards)
  for k, (ids, is_target, local, owned, real) in enumerate(want):
    target = class_shards.targets(jnp.asarray(labels), k, rows)
    np.testing.assert_array_equal(target.local_label, local, f'seed {seed}')
    np.testing.assert_array_equal(target.owned, owned, f'seed {seed}')
    for start in range(0, rows, 3):
      width = min(3, rows - start)
      block = class_shards.class_ids(k, rows, start, width)
      np.testing.assert_array_equal(block[0], ids[start:start + width])
      np.testing.assert_array_equal(
          class_shards.target_mask(block, jnp.asarray(labels)),
          is_target[:, start:start + width])
      np.testing.assert_array_equal(class_shards.is_real(block, num_classes),
                                    real[None, start:start + width])
  assert class_shards.is_real(class_shards.class_ids(0, rows), None) is None
  cols = class_shards.columns(jnp.asarray(labels), rows * num_shards)
  assert cols.valid is None and np.all(cols.owned)  # unsharded: shard 0 of 1


@pytest.mark.parametrize('num_shards', [1, 2, 4])
def test_sampled_labels(num_shards):
  """Shard k's j-th sampled row is class k * n + j of the sampled
  classifier: each label becomes its class's index in the shards' sampled
  classes, concatenated in shard order."""
  rng, seed = fresh_rng()
  num_classes, num_sample = 30, 6
  rows = class_shards.rows_per_shard(num_classes, num_shards)
  labels = rng.choice(num_classes, 5, replace=False)
  sampled = []
  for k in range(num_shards):
    mine = labels[labels // rows == k] - k * rows
    others = np.setdiff1d(np.arange(min(rows, num_classes - k * rows)), mine)
    pick = rng.choice(others, num_sample - mine.size, replace=False)
    sampled.append(np.sort(np.concatenate([mine, pick])))
  classes = np.concatenate([k * rows + s for k, s in enumerate(sampled)])
  want = np.array([np.flatnonzero(classes == y)[0] for y in labels])
  mesh = _mesh(num_shards)
  got = jax.jit(jax.shard_map(
      lambda r, y: class_shards.sampled_labels(y, r, rows, 'model'),
      mesh=mesh, in_specs=(jax.P('model'), jax.P()), out_specs=jax.P()))(
          np.concatenate(sampled).astype(np.int32), labels)
  np.testing.assert_array_equal(got, want, f'seed {seed}')
  if num_shards == 1:
    np.testing.assert_array_equal(
        class_shards.sampled_labels(jnp.asarray(labels),
                                    jnp.asarray(sampled[0]), rows), want)
