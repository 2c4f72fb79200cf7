"""The normalised classifier: cosines, head and per-sample loss, optionally
with the classifier's rows split over a mesh axis (model parallel), or
computed chunked and fused over the classes on one device.

The unsharded and the sharded path run the same code; the sharded one runs
it inside ``jax.shard_map`` with ``axis_name`` set, where the head and the
cross-entropy add their few collectives (DESIGN.md section 2). The class
count is padded to a multiple of the shard count with zero rows, which the
head masks out (logit -inf) through ``num_classes``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from npcface_jax import chunked_loss, losses
from npcface_jax.registry import Head, HeadOutput

Array = jax.Array


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """x / ||x||, finite (value and gradient) for an all-zero row."""
  sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True)
  return (x * lax.rsqrt(jnp.maximum(sq, eps * eps))).astype(x.dtype)


def cosine(embeddings: Array, weights: Array) -> Array:
  """cos (B, C) between embeddings (B, D) and class weights (C, D)."""
  return l2_normalize(embeddings) @ l2_normalize(weights).T


def padded_num_classes(num_classes: int, num_shards: int) -> int:
  """The row count of a classifier whose rows split evenly over the shards."""
  return math.ceil(num_classes / num_shards) * num_shards


def classifier_loss(embeddings: Array, weights: Array, labels: Array,
                    head: Head, state=None, params=None, *, axis_name=None,
                    num_classes: int | None = None,
                    chunk_size: int | None = None) -> tuple[Array, HeadOutput]:
  """Per-sample cross-entropy (B,) and the head's output for one shard
  (or the whole classifier when ``axis_name`` is None); the output's
  metrics hold the head's diagnostics and ``top1`` (B,) bool, whether the
  target logit is the largest.

  With ``chunk_size`` the loss runs chunked and fused (chunked_loss.py):
  same values and gradients, far less memory, and the returned HeadOutput
  has ``logits=None``.
  """
  if chunk_size is not None:
    ce, row, sums, top1 = chunked_loss.chunked_cross_entropy(
        embeddings, weights, labels, head.parts(), state, chunk_size=chunk_size,
        axis_name=axis_name, num_classes=num_classes)
    new_state, metrics = head.after_parts(state, row, sums)
    return ce, HeadOutput(None, new_state, jnp.zeros((), jnp.float32),
                          {**metrics, 'top1': top1})
  out = head(cosine(embeddings, weights), labels, state, params,
             axis_name=axis_name, num_classes=num_classes)
  ce, top1 = losses.cross_entropy_and_top1(out.logits, labels,
                                           axis_name=axis_name)
  return ce, out._replace(metrics={**out.metrics, 'top1': top1})


def sharded_classifier_loss(mesh: Mesh, head: Head, num_classes: int, *,
                            axis: str = 'model', batch_axis: str | None = None,
                            return_logits: bool = False,
                            chunk_size: int | None = None):
  """``f(embeddings, weights, labels, state, params) -> (ce, HeadOutput)``
  with the weights' rows (and AdaM-softmax's margins) split over ``axis``.

  ``weights`` has ``padded_num_classes(num_classes, mesh.shape[axis])`` rows.
  By default embeddings, labels and head state are replicated over the mesh
  and ``ce`` comes back replicated, ready for any criterion's ``reduce`` in
  the global view. With ``batch_axis`` (e.g. 'data' of a 2-D mesh) the batch
  is split over that axis as well, so each device scores only its rows
  against its classes; ``ce`` and the per-sample metrics come back split
  the same way. Heads whose state is a batch statistic (``head.
  batch_statistics``) need the whole batch on every shard and refuse it.
  Differentiate through f from outside (the global view): the gradient of a
  replicated input then comes out summed correctly (DESIGN.md s. 5).
  The logits (sharded on their class axis) come back only with
  ``return_logits``, since at millions of classes they are the largest array;
  with ``chunk_size`` each shard runs the chunked loss and no logits exist.
  """
  if chunk_size is not None and return_logits:
    raise ValueError('the chunked loss never forms the logits: '
                     'return_logits needs chunk_size=None')
  if batch_axis is not None and head.batch_statistics:
    raise ValueError(
        f'head {head.name!r} keeps a statistic of the whole batch in its '
        'state, so its batch cannot be split over shards: use batch_axis=None')

  def local(embeddings, weights, labels, state, params):
    ce, out = classifier_loss(embeddings, weights, labels, head, state, params,
                              axis_name=axis, num_classes=num_classes,
                              chunk_size=chunk_size)
    if out.logits is None or not return_logits:
      out = out._replace(logits=jnp.zeros((), jnp.float32))
    return ce, out

  rows = P(batch_axis)
  logits_spec = P(batch_axis, axis) if return_logits else P()
  in_specs = (rows, P(axis), rows, P(), P(axis))
  mapped = jax.shard_map(
      local, mesh=mesh, in_specs=in_specs,
      out_specs=(rows, HeadOutput(logits_spec, P(), P(), rows)))
  if AxisType.Explicit not in mesh.axis_types:
    return mapped

  def resharded(*args):
    # Explicit-axis meshes (jax.make_mesh's default) want the inputs laid
    # out as in_specs say before shard_map; an Auto mesh reshards itself.
    args = [jax.tree.map(lambda a, s=spec: jax.reshard(a, NamedSharding(mesh, s)),
                         arg) for arg, spec in zip(args, in_specs)]
    return mapped(*args)

  return resharded
