"""Criteria over head logits: softmax cross-entropy, focal, OHEM.

Kept apart from the heads so that any head combines with any criterion. Each
criterion is a reduction of the per-sample cross-entropy (``focal_reduce``,
``ohem_reduce``), the only piece that needs the classes: with ``axis_name`` it
runs on class-sharded logits inside ``jax.shard_map`` (row max by ``pmax``,
exp-sum and target logit by ``psum``), so the class-sharded classifier returns
it and any criterion reduces it in the global view. Columns whose logit is
-inf (padding classes) drop out of the softmax."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from npcface_jax.loss import class_shards

Array = jax.Array


def per_sample_cross_entropy(logits: Array, labels: Array, *, axis_name=None,
                             num_classes: int | None = None) -> Array:
  """-log softmax(logits)[y], (B,) float32, classes optionally sharded.

  ``num_classes`` masks padding columns when the head did not already.
  """
  return cross_entropy_and_top1(logits, labels, axis_name=axis_name,
                                num_classes=num_classes)[0]


def cross_entropy_and_top1(logits: Array, labels: Array, *, axis_name=None,
                           num_classes: int | None = None
                           ) -> tuple[Array, Array]:
  """The per-sample cross-entropy and whether the target logit is the
  largest (training top-1 under the head's margins), from one pass."""
  z = logits.astype(jnp.float32)
  cols = class_shards.columns(labels, z.shape[-1], axis_name, num_classes)
  if cols.valid is not None:
    z = jnp.where(cols.valid, z, -jnp.inf)
  zmax = lax.stop_gradient(jnp.max(z, axis=-1))
  if axis_name is not None:
    zmax = lax.pmax(zmax, axis_name)
  sumexp = jnp.sum(jnp.exp(z - zmax[:, None]), axis=-1)
  target = class_shards.take_target(z, cols)
  if axis_name is not None:
    sumexp, target = lax.psum((sumexp, target), axis_name)
  return jnp.log(sumexp) + (zmax - target), lax.stop_gradient(target >= zmax)


def one_vs_all_and_top1(logits: Array, labels: Array, weights, *,
                        axis_name=None, num_classes: int | None = None
                        ) -> tuple[Array, Array]:
  """The per-sample one-vs-all binary loss of SphereFace2 and UniFace,
  ``w.positive_weight * softplus(-z_y) + w.negative_weight * sum_{j != y}
  softplus(z_j)`` over the real classes (heads.OneVsAll), and whether the
  target logit is the largest; classes optionally sharded (psum, pmax)."""
  z = logits.astype(jnp.float32)
  cols = class_shards.columns(labels, z.shape[-1], axis_name, num_classes)
  negative = class_shards.negatives(cols.is_target, cols.valid)
  z_neg = jnp.where(negative, z, -jnp.inf)
  neg_sum = jnp.sum(jnp.where(negative, jax.nn.softplus(z_neg), 0.0), axis=-1)
  top = lax.stop_gradient(jnp.max(z_neg, axis=-1))
  target = class_shards.take_target(z, cols)
  if axis_name is not None:
    neg_sum, target = lax.psum((neg_sum, target), axis_name)
    top = lax.pmax(top, axis_name)
  loss = (weights.positive_weight * jax.nn.softplus(-target)
          + weights.negative_weight * neg_sum)
  return loss, lax.stop_gradient(target >= top)


def softmax_cross_entropy(logits: Array, labels: Array, *, axis_name=None,
                          num_classes: int | None = None) -> Array:
  """Mean softmax cross-entropy over the batch."""
  return jnp.mean(per_sample_cross_entropy(
      logits, labels, axis_name=axis_name, num_classes=num_classes))


def softmax_reduce(ce: Array, min_prob: float = 0.0) -> Array:
  """The mean of per-sample cross-entropy l = -log p_y. With ``min_prob``
  > 0 each sample's loss is reported as -log(max(p_y, min_prob)), its
  gradient left the unclamped one's: arcface_torch's DistCrossEntropy
  (clamp_min(1e-30) in its forward, a hand-written backward that ignores
  it); off (0), the loss as it is."""
  if min_prob > 0:
    cap = jnp.float32(-math.log(min_prob))
    ce = jnp.where(ce > cap, (ce - lax.stop_gradient(ce)) + cap, ce)
  return jnp.mean(ce)


def focal_reduce(ce: Array, gamma: float = 2.0) -> Array:
  """F-softmax from per-sample cross-entropy l = -log p_y:
  mean of (1 - p_y)^gamma * l = (1 - exp(-l))^gamma * l, full gradient."""
  # -expm1(-l) = 1 - p_y without cancellation; the floor keeps the power's
  # gradient finite where p_y == 1 and gamma < 1.
  one_minus_p = jnp.maximum(-jnp.expm1(-ce), 1e-30)
  return jnp.mean(one_minus_p ** gamma * ce)


def ohem_reduce(ce: Array, keep_fraction: float = 0.7) -> Array:
  """HM-softmax from per-sample cross-entropy: the mean over the hardest
  ceil(keep_fraction * B) samples, selected by loss and constant for grad."""
  if not 0.0 < keep_fraction <= 1.0:
    raise ValueError(f'keep_fraction must be in (0, 1], got {keep_fraction}')
  k = max(1, math.ceil(keep_fraction * ce.shape[0]))
  _, idx = lax.top_k(lax.stop_gradient(ce), k)
  return jnp.mean(ce[idx])


def focal_loss(logits: Array, labels: Array, *, gamma: float = 2.0,
               axis_name=None, num_classes: int | None = None) -> Array:
  """F-softmax (Lin et al.): mean of -(1 - p_y)^gamma log p_y."""
  return focal_reduce(per_sample_cross_entropy(
      logits, labels, axis_name=axis_name, num_classes=num_classes), gamma)


def ohem_loss(logits: Array, labels: Array, *, keep_fraction: float = 0.7,
              axis_name=None, num_classes: int | None = None) -> Array:
  """HM-softmax: mean cross-entropy of the hardest ceil(keep*B) samples of
  the batch (call it in the global view when the batch is sharded)."""
  return ohem_reduce(per_sample_cross_entropy(
      logits, labels, axis_name=axis_name, num_classes=num_classes),
      keep_fraction)
