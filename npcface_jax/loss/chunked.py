"""Cross-entropy over a margin head's logits of a normalised classifier,
computed a block of classes at a time and never holding the logits.

``chunked_cross_entropy`` equals ``per_sample_cross_entropy(head logits of
cosine(x, W))`` in value and gradient, but its forward keeps only the
cosines (B, C) and per-sample running sums (an online log-sum-exp, as in
flash attention), and its hand-written backward turns each block's cosines
straight into that block's classifier gradient. The normalised classifier is
never materialised either: each block of W is normalised where it is used.
Compared with autodiff through the full logits this saves several (B, C)
buffers of memory and passes over memory (benchmarks/RESULTS.md).

It relies on what every head with ``MarginParts`` guarantees: the logits'
Jacobian in cos is diagonal, so the backward needs only each logit's own
derivative. AdaCos (whose scale needs a pass over all logits first) and
AdaM-softmax (whose margins are parameters) have no parts; use the full
logits for them.

Class-sharded: inside ``jax.shard_map`` with W's rows split over
``axis_name`` (which shard holds which classes: class_shards.py), each
shard loops over its own rows; the target cosine, the head's sums and the
log-sum-exp are combined with psum/pmax, and the embeddings' gradient is
psum-ed, so the result equals the unsharded one. ``num_classes`` excludes
padding rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from npcface_jax.loss import class_shards
from npcface_jax.loss.heads import Given, MarginParts

Array = jax.Array

_FAR_BELOW = -1e30  # the running max before any block: finite, so no inf-inf


class Chunked(NamedTuple):
  """What the chunked loss returns; only ``ce`` has a gradient."""

  ce: Array  # (B,) per-sample cross-entropy
  row: object  # the head's row constants (parts.row)
  sums: tuple  # the head's per-sample sums over the negatives, all shards
  top1: Array  # (B,) bool, the target logit beats every negative logit
  cos_target: Array  # (B,) cosine to the target's row
  cos_nearest: Array  # (B,) largest cosine to a negative row (-inf: none)


def _normalize_rows(w):
  inv = lax.rsqrt(jnp.maximum(jnp.sum(w * w, axis=-1, keepdims=True), 1e-24))
  return w * inv, inv


def _normalize_rows_vjp(wn, inv, g):
  """Cotangent of w from that of wn = w / ||w||."""
  return inv * (g - jnp.sum(g * wn, axis=-1, keepdims=True) * wn)


def _blocks(num_rows: int, chunk_size: int):
  """How many equal blocks the loop runs, and the static remainder."""
  full = num_rows // chunk_size
  return full, num_rows - full * chunk_size


class _Shard:
  """This shard's place among the classes (the whole when unsharded), from
  class_shards, and the collectives over the class axis."""

  def __init__(self, w, labels, axis_name, num_classes):
    self.axis_name, self.num_classes = axis_name, num_classes
    self.labels, self.num_rows = labels, w.shape[0]
    self.index = class_shards.shard_index(axis_name)
    self.local_label, self.owned = class_shards.targets(labels, self.index,
                                                        self.num_rows)

  def is_negative(self, start, width):
    """Which columns of the block of local rows start.. are negatives."""
    ids = class_shards.class_ids(self.index, self.num_rows, start, width)
    return class_shards.negatives(class_shards.target_mask(ids, self.labels),
                                  class_shards.is_real(ids, self.num_classes))

  def target_rows(self, w):
    """The normalised target rows held here, with their inverse norms."""
    return _normalize_rows(w[self.local_label])

  def psum(self, x):
    return x if self.axis_name is None else lax.psum(x, self.axis_name)

  def varying(self, x, *inputs):
    """Marks a loop's initial carry as differing over every mesh axis that
    the inputs differ over (the class axis, and a batch axis if the batch
    is split too), like the loop's body."""
    if self.axis_name is None:
      return x
    want = frozenset({self.axis_name}).union(*map(_varying_axes, inputs))

    def cast(a):
      missing = tuple(sorted(want - _varying_axes(a)))
      return lax.pcast(a, missing, to='varying') if missing else a

    return jax.tree.map(cast, x)


def _varying_axes(x) -> frozenset:
  """The shard_map axes over which x differs (its type's 'vma')."""
  aval = jax.typeof(x)
  if hasattr(aval, 'vma'):
    return frozenset(aval.vma)
  return frozenset(aval.manual_axis_type.varying)


class _Reduction:
  """How the negatives' logits add up to each sample's loss, a block at a
  time, and each logit's share of the gradient: the softmax's online
  log-sum-exp (the target joins at the end), or a one-vs-all head's sum
  of binary losses (heads.OneVsAll)."""

  def __init__(self, one_vs_all):
    self.weights = one_vs_all

  def add(self, run_max, run_sum, logits, is_negative):
    """The running (max, sum) with a block's masked logits added."""
    new_max = jnp.maximum(run_max, jnp.max(logits, axis=-1))
    if self.weights is not None:
      return new_max, run_sum + jnp.sum(
          jnp.where(is_negative, jax.nn.softplus(logits), 0.0), axis=-1)
    return new_max, (run_sum * jnp.exp(run_max - new_max)
                     + jnp.sum(jnp.exp(logits - new_max[:, None]), axis=-1))

  def merge(self, run_max, run_sum, shard):
    """The shards' running (max, sum) combined."""
    if shard.axis_name is None:
      return run_max, run_sum
    top = lax.pmax(run_max, shard.axis_name)
    if self.weights is not None:
      return top, shard.psum(run_sum)
    return top, shard.psum(run_sum * jnp.exp(run_max - top))

  def loss(self, run_max, run_sum, z_y):
    """(per-sample loss, what the backward needs of the forward)."""
    if self.weights is not None:
      return (self.weights.positive_weight * jax.nn.softplus(-z_y)
              + self.weights.negative_weight * run_sum), run_sum
    lse = jnp.logaddexp(run_max + jnp.log(run_sum), z_y)
    return lse - z_y, lse

  def d_negative(self, logits, lse):
    """dLoss/dlogit of each negative."""
    if self.weights is not None:
      return self.weights.negative_weight * jax.nn.sigmoid(logits)
    return jnp.exp(logits - lse[:, None])

  def d_target(self, z_y, lse):
    """dLoss/dz_y: p_y - 1 for the softmax."""
    if self.weights is not None:
      return -self.weights.positive_weight * jax.nn.sigmoid(-z_y)
    return jnp.exp(z_y - lse) - 1.0


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _chunked(xn, w, labels, context, parts: MarginParts, chunk_size: int,
             axis_name, num_classes):
  return _forward(xn, w, labels, context, parts, chunk_size, axis_name,
                  num_classes)[0]


def _forward(xn, w, labels, context, parts, chunk_size, axis_name,
             num_classes):
  """``context``: the head's (state, Given); only the Given's params and
  (where the head keeps their gradient) norms get a gradient, through the
  row."""
  batch = xn.shape[0]
  shard = _Shard(w, labels, axis_name, num_classes)
  wy, inv_y = shard.target_rows(w)
  c_y = shard.psum(jnp.where(shard.owned, jnp.sum(xn * wy, axis=-1), 0.0))
  row = parts.row(c_y, *context)
  reduction = _Reduction(parts.one_vs_all)

  def block(w_block, start, carry):
    run_max, run_sum, sums, nearest = carry
    cos = xn @ _normalize_rows(w_block)[0].T
    is_negative = shard.is_negative(start, cos.shape[1])
    logits, block_sums = parts.negative(cos, row, is_negative)
    logits = jnp.where(is_negative, logits, -jnp.inf)
    new_max, run_sum = reduction.add(run_max, run_sum, logits, is_negative)
    sums = jax.tree.map(jnp.add, sums, block_sums)
    nearest = jnp.maximum(nearest, jnp.max(
        jnp.where(is_negative, cos, -jnp.inf), axis=-1))
    return cos, (new_max, run_sum, sums, nearest)

  # The per-sample sums' structure comes from the head: trace one tiny block.
  sums0 = jax.tree.map(
      jnp.zeros_like,
      jax.eval_shape(lambda: parts.negative(
          jnp.zeros((batch, 1)), row, jnp.ones((batch, 1), bool))[1]))
  carry = (jnp.full((batch,), _FAR_BELOW), jnp.zeros((batch,)), sums0,
           jnp.full((batch,), -jnp.inf))
  full, rest = _blocks(w.shape[0], chunk_size)

  def body(k, loop):
    cos_store, carry = loop
    start = k * chunk_size
    cos, carry = block(lax.dynamic_slice_in_dim(w, start, chunk_size), start,
                       carry)
    return lax.dynamic_update_slice_in_dim(cos_store, cos[None], k, 0), carry

  cos_store = lax.empty((full, batch, chunk_size), jnp.float32)
  cos_store, carry = lax.fori_loop(0, full, body,
                                   shard.varying((cos_store, carry), xn, w))
  cos_rest = None
  if rest:
    cos_rest, carry = block(w[full * chunk_size:], full * chunk_size, carry)
  run_max, run_sum, sums, nearest = carry
  sums = shard.psum(sums)
  run_max, run_sum = reduction.merge(run_max, run_sum, shard)
  if axis_name is not None:
    nearest = lax.pmax(nearest, axis_name)
  z_y = parts.positive(c_y, row, sums)
  ce, lse = reduction.loss(run_max, run_sum, z_y)
  top1 = z_y >= run_max  # the target beats every negative logit
  residuals = (xn, w, labels, wy, inv_y, c_y, row, sums, lse, z_y,
               cos_store, cos_rest, context)
  return Chunked(ce, row, sums, top1, c_y, nearest), residuals


def _backward(parts, chunk_size, axis_name, num_classes, residuals,
              cotangents):
  (xn, w, labels, wy, inv_y, c_y, row, sums, lse, z_y, cos_store,
   cos_rest, (state, given)) = residuals
  g = cotangents[0]  # the rest is for logging and analysis, not for grads
  shard = _Shard(w, labels, axis_name, num_classes)
  full, rest = _blocks(w.shape[0], chunk_size)
  reduction = _Reduction(parts.one_vs_all)
  # The row's gradient is followed only to what can have one (heads.py),
  # summed per shard, then over the shards once: differentiated as
  # varying, so that no block sums it over the shards.
  row_has_gradient = _row_has_gradient(given)
  row_here = shard.varying(row, xn, w)

  def block(w_block, start, cos):
    wn, inv = _normalize_rows(w_block)
    is_negative = shard.is_negative(start, cos.shape[1])
    logits, pull = _vjp(lambda c, r: parts.negative(c, r, is_negative)[0],
                        cos, row_here, row_has_gradient)
    dcos, *drow = pull(jnp.where(
        is_negative, g[:, None] * reduction.d_negative(logits, lse), 0.0))
    dw_block = _normalize_rows_vjp(wn, inv, dcos.T @ xn)
    return dcos @ wn, dw_block, drow

  def body(k, grads):
    dxn, dw, drow = grads
    start = k * chunk_size
    dx_k, dw_k, drow_k = block(lax.dynamic_slice_in_dim(w, start, chunk_size),
                               start, cos_store[k])
    return (dxn + dx_k, lax.dynamic_update_slice_in_dim(dw, dw_k, start, 0),
            jax.tree.map(jnp.add, drow, drow_k))

  drow0 = [jax.tree.map(jnp.zeros_like, row)] if row_has_gradient else []
  grads = (jnp.zeros_like(xn), lax.empty(w.shape, jnp.float32), drow0)
  dxn, dw, drow = lax.fori_loop(0, full, body, shard.varying(grads, xn, w))
  if rest:
    dx_r, dw_r, drow_r = block(w[full * chunk_size:], full * chunk_size,
                               cos_rest)
    dxn, drow = dxn + dx_r, jax.tree.map(jnp.add, drow, drow_r)
    dw = lax.dynamic_update_slice_in_dim(dw, dw_r, full * chunk_size, 0)
  # The target logits, through the positive's derivative, on the shard
  # that holds each target row (as varying, so that its row share is only
  # this shard's, like the negatives').
  _, pull = _vjp(lambda c, r: parts.positive(c, r, sums),
                 *shard.varying((c_y, row), xn, w), row_has_gradient)
  dc_y, *drow_y = pull(jnp.where(shard.owned,
                                 g * reduction.d_target(z_y, lse), 0.0))
  drow = jax.tree.map(jnp.add, drow, drow_y)
  dxn = dxn + dc_y[:, None] * wy
  dw = dw.at[shard.local_label].add(
      _normalize_rows_vjp(wy, inv_y, dc_y[:, None] * xn))
  # A batch split over another axis too: W's gradient sums over its shards.
  if batch_axes := tuple(sorted(_varying_axes(xn) - _varying_axes(w))):
    dw = lax.psum(dw, batch_axes)
  # The head's state (a batch statistic's history, a step) and its key get
  # no gradient; its params and norms get the row's, pulled back.
  dgiven = (_row_vjp(parts, c_y, state, given, shard.psum(drow[0]))
            if row_has_gradient else None)
  return shard.psum(dxn), dw, None, (None, dgiven)


def _row_has_gradient(given) -> bool:
  return bool(jax.tree.leaves(given.params)) or given.norms is not None


def _vjp(fn, c, row, with_row: bool):
  """fn(c, row) and its pull-back to (dc,), or to (dc, drow) ``with_row``."""
  if with_row:
    return jax.vjp(fn, c, row)
  return jax.vjp(lambda c: fn(c, row), c)


def _row_vjp(parts, c_y, state, given, drow):
  """The cotangent of the Given (its params and norms) from the row's."""
  row, pull = jax.vjp(
      lambda norms, params: parts.row(
          c_y, state, given._replace(norms=norms, params=params)),
      given.norms, given.params)
  # A row constant shared by a batch split over shards (a learnt bias):
  # its gradient sums over them.
  drow = jax.tree.map(
      lambda d, r: (lax.psum(d, axes) if (axes := tuple(sorted(
          _varying_axes(d) - _varying_axes(r)))) else d), drow, row)
  dnorms, dparams = pull(drow)
  return given._replace(norms=dnorms, key=None, params=dparams)


_chunked.defvjp(_forward, _backward)


def chunked_cross_entropy(embeddings: Array, weights: Array, labels: Array,
                          parts: MarginParts, state=None, *,
                          given: Given = Given(), chunk_size: int = 4096,
                          axis_name=None, num_classes: int | None = None):
  """``Chunked``: per-sample cross-entropy (B,) over the head's logits of
  cosine(embeddings, weights), with the head's row constants and sums
  (for its state and diagnostics), whether each target logit is the
  largest (top-1, bool), and each sample's cosine to its target and to its
  nearest negative (hard-sample analysis), ``chunk_size`` classes at a
  time.
  ``state`` is the head's state (SphereFace, CurricularFace) and ``given``
  what it needs besides cosines (heads.Given), both passed to the parts'
  ``row``; only the Given's params and norms are differentiated, through
  the row (where a head's row has no gradient, theirs is zero). A head
  with ``one_vs_all`` parts gets its binary loss instead of the softmax
  cross-entropy, the same way.

  ``embeddings`` (B, D) and ``weights`` (C, D) need not be normalised; both
  are, as in ``classifier.cosine``. Arithmetic is float32. With
  ``axis_name`` (inside shard_map) ``weights`` are this shard's rows and
  ``num_classes`` the real class count when the rows are padded.
  """
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be positive, got {chunk_size}')
  chunk_size = min(chunk_size, weights.shape[0])
  xn, _ = _normalize_rows(embeddings.astype(jnp.float32))
  w = weights.astype(jnp.float32)
  return _chunked(xn, w, labels.astype(jnp.int32), (state, given), parts,
                  chunk_size, axis_name, num_classes)
