"""Which shard of a class-sharded classifier owns which classes.

The classifier's rows are padded with zero rows to a multiple of the shard
count and split evenly: shard k of ``num_rows`` rows owns classes
``k * num_rows .. (k + 1) * num_rows - 1``, and classes from ``num_classes``
on are padding, never a target or a negative. Heads, criteria, the chunked
loss and Partial FC's sampling all take their place among the classes from
here. Unsharded code is shard 0 of one; inside ``jax.shard_map`` the shard
is ``lax.axis_index`` of the class axis. Pure functions, jit-safe.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def padded_num_classes(num_classes: int, num_shards: int) -> int:
  """The row count of a classifier whose rows split evenly over the shards."""
  return math.ceil(num_classes / num_shards) * num_shards


def rows_per_shard(num_classes: int, num_shards: int) -> int:
  return padded_num_classes(num_classes, num_shards) // num_shards


def shard_index(axis_name=None):
  """This shard's position on the class axis (0 when unsharded)."""
  return 0 if axis_name is None else lax.axis_index(axis_name)


def class_ids(shard, num_rows: int, start=0, width: int | None = None
              ) -> Array:
  """(1, width) int32: the classes of the shard's local rows start ..
  start + width - 1 (all its rows by default)."""
  width = num_rows if width is None else width
  return shard * num_rows + start + lax.broadcasted_iota(
      jnp.int32, (1, width), 1)


def is_real(ids: Array, num_classes: int | None) -> Array | None:
  """Which of ``ids`` are classes rather than padding; None when every
  column is real (``num_classes`` None)."""
  return None if num_classes is None else ids < num_classes


def target_mask(ids: Array, labels: Array) -> Array:
  """(B, width) bool: column j is sample i's target."""
  return ids == labels.astype(jnp.int32)[:, None]


def negatives(is_target: Array, real: Array | None) -> Array:
  """The columns that count as negatives: neither the target nor padding."""
  return ~is_target if real is None else ~is_target & real


class Targets(NamedTuple):
  """Where each sample's target sits on this shard."""

  local_label: Array  # (B,) int32, the target's local row, clipped in range
  owned: Array  # (B,) bool, whether this shard holds the target


def targets(labels: Array, shard, num_rows: int) -> Targets:
  local = labels.astype(jnp.int32) - shard * num_rows
  owned = (local >= 0) & (local < num_rows)
  return Targets(jnp.clip(local, 0, num_rows - 1), owned)


class Columns(NamedTuple):
  """One shard's columns of a (B, num_rows) block of logits or cosines."""

  is_target: Array  # (B, C_local) bool
  local_label: Array  # (B,) int32, the target's local column, clipped
  owned: Array  # (B,) bool, whether this shard holds the target
  valid: Array | None  # (1, C_local) bool, None when every column is real


def columns(labels: Array, num_rows: int, axis_name=None,
            num_classes: int | None = None) -> Columns:
  shard = shard_index(axis_name)
  ids = class_ids(shard, num_rows)
  return Columns(target_mask(ids, labels), *targets(labels, shard, num_rows),
                 is_real(ids, num_classes))


def take_target(x: Array, cols: Columns, axis_name=None) -> Array:
  """x[i, y_i] (B,), gathered (not a pass over B x C) on the shard that holds
  class y_i and psum-ed to all shards when ``axis_name`` is given."""
  picked = jnp.take_along_axis(x, cols.local_label[:, None], axis=-1)[:, 0]
  picked = jnp.where(cols.owned, picked, 0.0)
  return picked if axis_name is None else lax.psum(picked, axis_name)


def sampled_labels(labels: Array, rows: Array, num_rows: int,
                   axis_name=None) -> Array:
  """Labels renumbered for the classifier made of every shard's sampled
  ``rows`` (Partial FC: increasing local rows, as many on every shard, each
  target's row among its shard's): shard k's j-th sampled row becomes
  class ``k * len(rows) + j``."""
  shard, num_sample = shard_index(axis_name), rows.shape[0]
  position = jnp.zeros((num_rows,), jnp.int32).at[rows].set(
      jnp.arange(num_sample, dtype=jnp.int32))
  target = targets(labels, shard, num_rows)
  renumbered = jnp.where(target.owned,
                         shard * num_sample + position[target.local_label], 0)
  # Each label's row is held by one shard; the others contribute 0.
  return renumbered if axis_name is None else lax.psum(renumbered, axis_name)
