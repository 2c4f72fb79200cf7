"""The normalised classifier: cosines, head and per-sample loss, optionally
with the classifier's rows split over a mesh axis (model parallel), or
computed chunked and fused over the classes on one device.

The unsharded and the sharded path run the same code; the sharded one runs
it inside ``jax.shard_map`` with ``axis_name`` set, where the head and the
cross-entropy add their few collectives (psum/pmax over the class axis). The
class count is padded to a multiple of the shard count with zero rows, which
the head masks out (logit -inf) through ``num_classes`` (class_shards.py).

Partial FC (An et al., 2021) is optional: with ``num_sample`` each shard
scores only that many of its rows, every row that is some sample's target
plus uniformly random others, drawn afresh each step from ``key``. Shapes
stay static. The head sees the sampled columns as the whole classifier, so
NPCFace's hard negatives, their mean and count, the softmax and the top-1
are all taken over the sampled classes, as in insightface's PartialFC,
whose losses see only the sampled logits. Unsampled rows get a zero
gradient (the optimizer's momentum and weight decay still move them, as in
insightface's PartialFC_V2).

What a head needs besides cosines (``head.needs``, as heads.Given) is
filled in here, the same on every path: each sample's embedding norm from
the embeddings the loss is given (per sample, so it travels with the batch
when the batch is split over shards), and the step's ``head_key``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from npcface_jax.common.arrays import l2_normalize, row_norms
from npcface_jax.loss import chunked, class_shards, heads
from npcface_jax.loss.heads import Given, Head, HeadOutput

Array = jax.Array


def cosine(embeddings: Array, weights: Array) -> Array:
  """cos (B, C) between embeddings (B, D) and class weights (C, D)."""
  return l2_normalize(embeddings) @ l2_normalize(weights).T


def num_sampled(sample_rate: float, rows_per_shard: int) -> int | None:
  """Rows each shard scores at Partial FC's ``sample_rate`` (None: all)."""
  if not 0.0 < sample_rate <= 1.0:
    raise ValueError(f'sample_rate must be in (0, 1], got {sample_rate}')
  n = math.ceil(sample_rate * rows_per_shard)
  return None if n >= rows_per_shard else n


def check_sampling(num_classes: int, num_shards: int, num_sample: int,
                   batch_rows: int) -> None:
  """Raises ValueError where static-shape sampling could go wrong: a shard
  with fewer sampled rows than the batch could hold more distinct targets
  than it keeps, and the last shard must have enough real (not padding)
  rows to fill its sample."""
  rows = class_shards.rows_per_shard(num_classes, num_shards)
  last_real = num_classes - (num_shards - 1) * rows
  if num_sample < min(batch_rows, rows):
    raise ValueError(
        f'{num_sample} sampled classes per shard cannot hold the targets of '
        f'{batch_rows} samples: raise the sample rate (to at least '
        f'{min(batch_rows, rows) / rows:.3g}) or lower the batch')
  if num_sample > last_real:
    raise ValueError(
        f'{num_sample} sampled classes per shard, but the last of the '
        f'{num_shards} shards holds only {last_real} real classes (the rest '
        f'pad {num_classes} classes to {num_shards} x {rows}): lower the '
        'sample rate or use a class-count-dividing model_parallel')


def rows_to_sample(sample_rate: float, num_classes: int, head: Head,
                   mesh: Mesh, batch_size: int) -> int | None:
  """Partial FC's rows scored per class shard of ``mesh`` at
  ``sample_rate`` (None: all of them), checked against the batch each shard
  sees (split_batch_axis); ValueError naming the fix."""
  shards = mesh.shape['model']
  num_sample = num_sampled(sample_rate,
                           class_shards.rows_per_shard(num_classes, shards))
  if num_sample is not None:
    split = split_batch_axis(head, mesh) is not None
    check_sampling(num_classes, shards, num_sample,
                   batch_size // (mesh.shape['data'] if split else 1))
  return num_sample


def sample_classes(key: Array, labels: Array, shard, num_rows: int,
                   num_sample: int, num_classes: int | None = None) -> Array:
  """The local rows (num_sample,) that shard ``shard`` of ``num_rows`` rows
  scores, increasing: every row that is a target of ``labels``, then rows
  drawn uniformly without replacement (key folded with the shard index),
  padding rows (classes from ``num_classes`` on) only if nothing else is
  left."""
  target = class_shards.targets(labels, shard, num_rows)
  score = jax.random.uniform(jax.random.fold_in(key, shard), (num_rows,))
  real = class_shards.is_real(class_shards.class_ids(shard, num_rows)[0],
                              num_classes)
  if real is not None:
    score = jnp.where(real, score, -1.0)
  score = score.at[jnp.where(target.owned, target.local_label, num_rows)].set(
      2.0, mode='drop')
  return jnp.sort(lax.top_k(score, num_sample)[1])


def _sampled(key, weights, labels, params, per_class, num_sample, axis_name,
             num_classes):
  """The sampled rows of the weights (and per-class head parameters), and
  the labels renumbered to the sampled classes
  (class_shards.sampled_labels)."""
  num_rows = weights.shape[0]
  rows = sample_classes(key, labels, class_shards.shard_index(axis_name),
                        num_rows, num_sample, num_classes)
  labels = class_shards.sampled_labels(labels, rows, num_rows, axis_name)
  params = {k: v[rows] if k in per_class else v for k, v in params.items()}
  return weights[rows], labels, params


def given(head: Head, embeddings: Array, key: Array | None,
          params=None) -> Given:
  """What the head needs besides cosines (``head.needs``), from the
  embeddings (each sample's norm, without gradient unless the head keeps
  it, ``norm_gradient``), the step's key for the head and the head's
  parameters; ValueError when it needs a key and none was passed."""
  norms = None
  if 'norms' in head.needs:
    norms = row_norms(embeddings)
    if not head.norm_gradient:
      norms = lax.stop_gradient(norms)
  if 'key' in head.needs and key is None:
    raise ValueError(f'head {head.name!r} draws at random: pass head_key')
  return Given(norms, key if 'key' in head.needs else None, params)


def with_norm_loss(head: Head, embeddings: Array, out: HeadOutput
                   ) -> HeadOutput:
  """The head's output with its norm regulariser (MagFace's) added to its
  aux_loss, from the whole batch's embeddings (the global view)."""
  penalty = head.norm_loss(row_norms(embeddings))
  return out if penalty is None else out._replace(
      aux_loss=out.aux_loss + penalty)


def classifier_loss(embeddings: Array, weights: Array, labels: Array,
                    head: Head, state=None, params=None, *, axis_name=None,
                    num_classes: int | None = None,
                    chunk_size: int | None = None,
                    num_sample: int | None = None,
                    key: Array | None = None,
                    head_key: Array | None = None
                    ) -> tuple[Array, HeadOutput]:
  """Per-sample cross-entropy (B,) and the head's output for one shard
  (or the whole classifier when ``axis_name`` is None); the output's
  metrics hold the head's diagnostics, ``top1`` (B,) bool, whether the
  target logit is the largest, and each sample's ``cos_target`` and
  ``cos_nearest`` (target_and_nearest; over the sampled classes with
  Partial FC).

  With ``chunk_size`` the loss runs chunked and fused (chunked.py):
  same values and gradients, far less memory, and the returned HeadOutput
  has ``logits=None``.

  With ``num_sample`` (Partial FC) only that many rows of ``weights``,
  drawn with ``key``, are scored (see the module docstring); the caller
  keeps ``num_sample`` within ``check_sampling``'s bounds, so no padding
  row is drawn and ``num_classes`` no longer applies.

  ``head_key`` is the step's key for a head that draws at random
  (``head.needs``); a head that needs norms gets them from ``embeddings``.
  Unsharded (``axis_name`` None), the output's aux_loss includes the
  head's norm regulariser (with_norm_loss); sharded, the caller adds it in
  the global view.
  """
  if num_sample is not None:
    if key is None:
      raise ValueError(f'num_sample={num_sample} draws classes at random: '
                       'pass a key')
    weights, labels, sampled = _sampled(
        key, weights, labels, params or {}, head.per_class_params,
        num_sample, axis_name, num_classes)
    params, num_classes = sampled, None
  extra = given(head, embeddings, head_key, params)
  if chunk_size is not None:
    fused = chunked.chunked_cross_entropy(
        embeddings, weights, labels, head.parts(), state, given=extra,
        chunk_size=chunk_size, axis_name=axis_name, num_classes=num_classes)
    new_state, metrics = head.after(state, fused.row, fused.sums)
    ce, out = fused.ce, HeadOutput(None, new_state, jnp.zeros((), jnp.float32),
                                   {**metrics, 'top1': fused.top1,
                                    'cos_target': fused.cos_target,
                                    'cos_nearest': fused.cos_nearest})
  else:
    cos = cosine(embeddings, weights)
    out = head(cos, labels, state, params, given=extra, axis_name=axis_name,
               num_classes=num_classes)
    ce, top1 = head.per_sample_loss(out.logits, labels, axis_name=axis_name)
    out = out._replace(metrics={
        **out.metrics, 'top1': top1,
        **target_and_nearest(cos, labels, axis_name, num_classes)})
  if axis_name is None:
    out = with_norm_loss(head, embeddings, out)
  return ce, out


def target_and_nearest(cos: Array, labels: Array, axis_name=None,
                       num_classes: int | None = None) -> dict[str, Array]:
  """Each sample's cosine to its target ('cos_target') and its largest
  cosine to any negative class ('cos_nearest', -inf when there is none),
  (B,) float32 without gradient, through the loss's collectives (a psum
  for the target, a pmax for the maximum) when class-sharded."""
  c = lax.stop_gradient(cos).astype(jnp.float32)
  cols = class_shards.columns(labels, c.shape[-1], axis_name, num_classes)
  nearest = jnp.max(jnp.where(class_shards.negatives(cols.is_target,
                                                     cols.valid), c, -jnp.inf),
                    axis=-1)
  return {'cos_target': class_shards.take_target(c, cols, axis_name),
          'cos_nearest': (nearest if axis_name is None
                          else lax.pmax(nearest, axis_name))}


def misclassified(cos_target: Array, cos_nearest: Array, margin) -> Array:
  """(B,) bool: some negative's cosine is above cos(theta_y + margin), the
  hard-sample test of MV-softmax and of NPCFace's mask (heads.NPCFace,
  with margin = its hard_margin); margin 0 is a plain top-1 error."""
  return cos_nearest > heads.cos_add(cos_target, margin)


def sharded_classifier_loss(mesh: Mesh, head: Head, num_classes: int, *,
                            axis: str = 'model', batch_axis: str | None = None,
                            return_logits: bool = False,
                            chunk_size: int | None = None,
                            num_sample: int | None = None):
  """``f(embeddings, weights, labels, state, params[, key, head_key]) ->
  (ce, HeadOutput)`` with the weights' rows (and AdaM-softmax's margins)
  split over ``axis``: ``class_shards.padded_num_classes(num_classes,
  mesh.shape[axis])`` rows.

  By default embeddings, labels and head state are replicated over the mesh
  and ``ce`` comes back replicated, for any criterion's ``reduce``. With
  ``batch_axis`` (e.g. 'data' of a 2-D mesh) the batch is split over that
  axis as well, so each device scores only its rows against its classes;
  ``ce`` and the per-sample metrics come back split the same way. Heads
  whose state is a batch statistic (``head.batch_statistics``) need the
  whole batch on every shard and refuse it.
  Differentiate through f from outside (the global view).
  The logits (sharded on their class axis) come back only with
  ``return_logits``, since at millions of classes they are the largest array;
  with ``chunk_size`` each shard runs the chunked loss and no logits exist.
  With ``num_sample`` each shard scores that many of its rows (Partial FC),
  drawn from ``key`` (replicated); the logits are then the sampled ones.
  ``head_key`` (replicated) goes to a head that draws at random (folded
  with the 'data' index where the batch is split); its norms come from each
  shard's rows, its norm regulariser from the whole batch.
  """
  _check_sharded_options(head, batch_axis, return_logits, chunk_size)

  def local(embeddings, weights, labels, state, params, key, head_key):
    if head_key is not None and batch_axis is not None:
      # Each shard of the batch draws for its own rows: from its own key.
      head_key = jax.random.fold_in(head_key, lax.axis_index(batch_axis))
    ce, out = classifier_loss(embeddings, weights, labels, head, state, params,
                              axis_name=axis, num_classes=num_classes,
                              chunk_size=chunk_size, num_sample=num_sample,
                              key=key, head_key=head_key)
    if out.logits is None or not return_logits:
      out = out._replace(logits=jnp.zeros((), jnp.float32))
    return ce, out

  rows = P(batch_axis)
  logits_spec = P(batch_axis, axis) if return_logits else P()

  def loss(embeddings, weights, labels, state, params, key=None,
           head_key=None):
    _check_key(key, num_sample)
    # A head's per-class parameters split like the classifier's rows; the
    # others (a learnt bias) replicated.
    in_specs = (rows, P(axis), rows, P(), {
        k: P(axis) if k in head.per_class_params else P() for k in params},
                P(), P())
    mapped = jax.shard_map(
        local, mesh=mesh, in_specs=in_specs,
        out_specs=(rows, HeadOutput(logits_spec, P(), P(), rows)))
    args = (embeddings, weights, labels, state, params, key, head_key)
    ce, out = mapped(*_laid_out(mesh, args, in_specs))
    return ce, with_norm_loss(head, embeddings, out)

  return loss


def _check_key(key, num_sample) -> None:
  if (key is None) != (num_sample is None):
    raise ValueError('a key is needed exactly when classes are sampled '
                     f'(num_sample={num_sample})')


def split_batch_axis(head: Head, mesh: Mesh,
                     axis: str = 'model') -> str | None:
  """The mesh axis a class-sharded loss splits the batch over: 'data' when
  the classes are sharded and the head keeps no statistic of the whole
  batch; None when every shard (or the one classifier) scores the whole
  batch. The rule in one place: the trainer asks it, and
  sharded_classifier_loss refuses a split it forbids."""
  if mesh.shape[axis] == 1 or head.batch_statistics:
    return None
  return 'data'


def _check_sharded_options(head: Head, batch_axis, return_logits: bool,
                           chunk_size) -> None:
  if chunk_size is not None and return_logits:
    raise ValueError('the chunked loss never forms the logits: '
                     'return_logits needs chunk_size=None')
  if batch_axis is not None and head.batch_statistics:
    raise ValueError(
        f'head {head.name!r} keeps a statistic of the whole batch in its '
        'state, so its batch cannot be split over shards: use batch_axis=None')


def _laid_out(mesh: Mesh, args, in_specs):
  """The arguments resharded as ``in_specs`` say where the mesh has
  Explicit axes (jax.make_mesh's default), which want their inputs laid out
  before shard_map; an Auto mesh reshards itself."""
  if AxisType.Explicit not in mesh.axis_types:
    return args
  return [jax.tree.map(lambda s, a: jax.reshard(a, NamedSharding(mesh, s)),
                       spec, arg, is_leaf=lambda x: isinstance(x, P))
          for arg, spec in zip(args, in_specs)]
