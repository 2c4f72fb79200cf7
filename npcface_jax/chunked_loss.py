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
logits for them. This path is for an unsharded classifier.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from npcface_jax.heads import MarginParts

Array = jax.Array

_FAR_BELOW = -1e30  # the running max before any block: finite, so no inf-inf


def _normalize_rows(w):
  inv = lax.rsqrt(jnp.maximum(jnp.sum(w * w, axis=-1, keepdims=True), 1e-24))
  return w * inv, inv


def _normalize_rows_vjp(wn, inv, g):
  """Cotangent of w from that of wn = w / ||w||."""
  return inv * (g - jnp.sum(g * wn, axis=-1, keepdims=True) * wn)


def _blocks(num_classes: int, chunk_size: int):
  """(start, size) of a loop of equal blocks, then the static remainder."""
  full = num_classes // chunk_size
  return full, num_classes - full * chunk_size


def _block_columns(start, cos, labels):
  """Which of the block's columns (global classes start..) are negatives."""
  cols = start + lax.broadcasted_iota(jnp.int32, (1, cos.shape[1]), 1)
  return cols != labels[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked(xn, w, labels, parts: MarginParts, chunk_size: int):
  return _forward(xn, w, labels, parts, chunk_size)[0]


def _forward(xn, w, labels, parts, chunk_size):
  batch, num_classes = xn.shape[0], w.shape[0]
  wy, _ = _normalize_rows(w[labels])
  c_y = jnp.sum(xn * wy, axis=-1)
  row = parts.row(c_y)

  def block(w_block, start, carry):
    run_max, run_sum, sums = carry
    cos = xn @ _normalize_rows(w_block)[0].T
    is_negative = _block_columns(start, cos, labels)
    logits, block_sums = parts.negative(cos, row, is_negative)
    logits = jnp.where(is_negative, logits, -jnp.inf)
    new_max = jnp.maximum(run_max, jnp.max(logits, axis=-1))
    run_sum = (run_sum * jnp.exp(run_max - new_max)
               + jnp.sum(jnp.exp(logits - new_max[:, None]), axis=-1))
    sums = jax.tree.map(jnp.add, sums, block_sums)
    return cos, (new_max, run_sum, sums)

  # The per-sample sums' structure comes from the head: trace one tiny block.
  sums0 = jax.tree.map(
      jnp.zeros_like,
      jax.eval_shape(lambda: parts.negative(
          jnp.zeros((batch, 1)), row, jnp.ones((batch, 1), bool))[1]))
  carry = (jnp.full((batch,), _FAR_BELOW), jnp.zeros((batch,)), sums0)
  full, rest = _blocks(num_classes, chunk_size)

  def body(k, state):
    cos_store, carry = state
    start = k * chunk_size
    cos, carry = block(lax.dynamic_slice_in_dim(w, start, chunk_size), start,
                       carry)
    return lax.dynamic_update_slice_in_dim(cos_store, cos[None], k, 0), carry

  cos_store = lax.empty((full, batch, chunk_size), jnp.float32)
  cos_store, carry = lax.fori_loop(0, full, body, (cos_store, carry))
  cos_rest = None
  if rest:
    cos_rest, carry = block(w[full * chunk_size:], full * chunk_size, carry)
  run_max, run_sum, sums = carry
  z_y = parts.positive(c_y, row, sums)
  lse = jnp.logaddexp(run_max + jnp.log(run_sum), z_y)
  ce = lse - z_y
  residuals = (xn, w, labels, wy, c_y, row, sums, lse, z_y, cos_store,
               cos_rest)
  return (ce, row, sums), residuals


def _backward(parts, chunk_size, residuals, cotangents):
  (xn, w, labels, wy, c_y, row, sums, lse, z_y, cos_store,
   cos_rest) = residuals
  g = cotangents[0]  # row and sums are outputs for logging, not for grads
  full, rest = _blocks(w.shape[0], chunk_size)

  def block(w_block, start, cos):
    wn, inv = _normalize_rows(w_block)
    is_negative = _block_columns(start, cos, labels)
    logits, dlogits = jax.jvp(lambda c: parts.negative(c, row, is_negative)[0],
                              (cos,), (jnp.ones_like(cos),))
    prob = jnp.where(is_negative, jnp.exp(logits - lse[:, None]), 0.0)
    dcos = (g[:, None] * prob) * dlogits
    dw_block = _normalize_rows_vjp(wn, inv, dcos.T @ xn)
    return dcos @ wn, dw_block

  def body(k, state):
    dxn, dw = state
    start = k * chunk_size
    dx_k, dw_k = block(lax.dynamic_slice_in_dim(w, start, chunk_size), start,
                       cos_store[k])
    return dxn + dx_k, lax.dynamic_update_slice_in_dim(dw, dw_k, start, 0)

  state = (jnp.zeros_like(xn), lax.empty(w.shape, jnp.float32))
  dxn, dw = lax.fori_loop(0, full, body, state)
  if rest:
    dx_r, dw_r = block(w[full * chunk_size:], full * chunk_size, cos_rest)
    dxn = dxn + dx_r
    dw = lax.dynamic_update_slice_in_dim(dw, dw_r, full * chunk_size, 0)
  # The target logits: dCE/dz_y = p_y - 1, through the positive's derivative.
  dpos = jax.grad(lambda c: jnp.sum(parts.positive(c, row, sums)))(c_y)
  dc_y = g * (jnp.exp(z_y - lse) - 1.0) * dpos
  dxn = dxn + dc_y[:, None] * wy
  inv_y = lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(w[labels]), -1,
                                        keepdims=True), 1e-24))
  dw = dw.at[labels].add(_normalize_rows_vjp(wy, inv_y, dc_y[:, None] * xn))
  return dxn, dw, None


_chunked.defvjp(_forward, _backward)


def chunked_cross_entropy(embeddings: Array, weights: Array, labels: Array,
                          parts: MarginParts, *, chunk_size: int = 4096):
  """Per-sample cross-entropy (B,) over the head's logits of
  cosine(embeddings, weights), with the head's row constants and sums
  (for its state and diagnostics), ``chunk_size`` classes at a time.

  ``embeddings`` (B, D) and ``weights`` (C, D) need not be normalised; both
  are, as in ``classifier.cosine``. Arithmetic is float32.
  """
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be positive, got {chunk_size}')
  chunk_size = min(chunk_size, weights.shape[0])
  xn, _ = _normalize_rows(embeddings.astype(jnp.float32))
  w = weights.astype(jnp.float32)
  return _chunked(xn, w, labels.astype(jnp.int32), parts, chunk_size)
