"""Margin heads: pure functions from cosines to scaled logits.

Every head takes ``cos`` (B, C), the cosines between L2-normalised embeddings
and class weights, and integer ``labels`` (B,), and returns scaled logits of
cos's dtype (arithmetic is float32 inside, so bfloat16 inputs are safe).
Heads with state (SphereFace, AdaCos, CurricularFace) take it and return the
new state; nothing is mutated. Each docstring gives its math, with the
paper's equation numbers.

Class-sharded use: inside ``jax.shard_map`` with the classifier's rows split
over a mesh axis, pass ``axis_name`` and each shard's ``cos`` holds only its
own columns (which classes a shard owns: class_shards.py). Heads that
need the target cosine on every shard get it with one ``psum``; NPCFace also
``psum``s its hard-negative sum and count, so the logits equal the unsharded
ones. ``num_classes`` marks columns past the real class count (padding that
makes C divisible by the shard count): they never count as hard negatives and
get logit -inf, so any softmax criterion ignores them.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from npcface_jax.loss import class_shards

Array = jax.Array

# sqrt(1 - c^2) is clamped here so that d/dc stays finite at c = +-1 (float32
# has no c with 0 < 1 - c^2 < 1.2e-7 except c = +-1 itself, where the
# gradient of the clamp is 0).
_SIN_EPS = 1e-12


# --------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------


def _psum(x, axis_name):
  return x if axis_name is None else lax.psum(x, axis_name)


def safe_sin(c: Array) -> Array:
  """sqrt(1 - c^2) with a finite derivative for every c in [-1, 1]."""
  return jnp.sqrt(jnp.maximum(1.0 - c * c, _SIN_EPS))


def cos_add(c: Array, m) -> Array:
  """cos(arccos(c) + m) by the angle-sum identity (no 1/sin(theta) in d/dc)."""
  return c * jnp.cos(m) - safe_sin(c) * jnp.sin(m)


def arc_positive(c_y: Array, m, easy_margin: bool = False) -> Array:
  """ArcFace's positive cosine cos(theta_y + m), unscaled.

  Where theta_y + m > pi the angle would wrap and the logit grow again; there
  ArcFace's monotone fallback cos_y - m*sin(m) is used. With ``easy_margin``
  no margin is applied where cos_y <= 0 (insightface's easy_margin, which
  FaceX-Zoo's NPCFace also uses).
  """
  theta = jnp.arccos(jnp.clip(lax.stop_gradient(c_y), -1.0, 1.0))
  if easy_margin:
    return jnp.where(lax.stop_gradient(c_y) > 0, cos_add(c_y, m), c_y)
  return jnp.where(theta + m > math.pi, c_y - m * jnp.sin(m), cos_add(c_y, m))


def finish(logits: Array, cols: class_shards.Columns, dtype) -> Array:
  """Masks padding columns to -inf and casts back to the input dtype."""
  if cols.valid is not None:
    logits = jnp.where(cols.valid, logits, -jnp.inf)
  return logits.astype(dtype)


def _f32(cos: Array) -> Array:
  return cos.astype(jnp.promote_types(cos.dtype, jnp.float32))


# --------------------------------------------------------------------------
# Margin heads as three parts
# --------------------------------------------------------------------------
#
# Every head except AdaCos and AdaM-softmax is written as three pure parts,
# so that its math lives in one place and serves both the full (B, C) logits
# below and the chunked fused cross-entropy (npcface_jax.loss.chunked), which
# never holds all logits at once:
#   row(c_y, state) -> per-sample constants from the target cosines (B,)
#       and the head's state (passed in, never closed over, so that traced
#       state works under jit and custom_vjp);
#   negative(c, row, is_negative) -> (scaled logits of a block of columns,
#       per-sample partial sums over that block's negatives, a tuple);
#   positive(c_y, row, sums) -> the scaled target logit (B,).
# The logits' Jacobian in cos is diagonal (masks, margins and batch
# statistics are constants for the gradient), which the fused path relies on.


class MarginParts(NamedTuple):
  row: Callable[[Array, Any], Any]
  negative: Callable[[Array, Any, Array], tuple[Array, tuple[Array, ...]]]
  positive: Callable[[Array, Any, tuple[Array, ...]], Array]


def assemble(parts: MarginParts, cos: Array, labels: Array, *, state=None,
             axis_name=None, num_classes: int | None = None):
  """Full logits (B, C) in cos's dtype, with the row constants and sums."""
  c = _f32(cos)
  cols = class_shards.columns(labels, c.shape[-1], axis_name, num_classes)
  c_y = class_shards.take_target(c, cols, axis_name)
  row = parts.row(c_y, state)
  is_negative = class_shards.negatives(cols.is_target, cols.valid)
  negative, sums = parts.negative(c, row, is_negative)
  sums = _psum(sums, axis_name)
  positive = parts.positive(c_y, row, sums)
  logits = jnp.where(cols.is_target, positive[:, None], negative)
  return finish(logits, cols, cos.dtype), row, sums


def _plain_negative(scale):
  return lambda c, row, is_negative: (scale * c, ())


def _hard(c, threshold, is_negative):
  """M_ij = [j != y_i] and [cos_ij > threshold_i], constant for the grad."""
  return lax.stop_gradient((c > threshold[:, None]) & is_negative)


# --------------------------------------------------------------------------
# NPCFace (the seed paper, eqs. 10-12)
# --------------------------------------------------------------------------

NPCFACE_PRESETS: dict[str, dict[str, Any]] = {
    # The paper: s is not stated there; 64 is the usual ArcFace scale.
    'paper': dict(scale=64.0, m0=0.4, m1=0.2, t=1.1, alpha=0.25,
                  hard_margin=None, easy_margin=False),
    # FaceX-Zoo's widely used PyTorch head.
    'facex_zoo': dict(scale=32.0, m0=0.4, m1=0.2, t=1.1, alpha=0.2,
                      hard_margin=0.35, easy_margin=True),
    # Table I ablations: negative part only (ArcFace positive with m0) ...
    'negative_only': dict(scale=64.0, m0=0.4, m1=0.0, t=1.1, alpha=0.25,
                          hard_margin=None, easy_margin=False),
    # ... and positive part only (plain negatives, cooperative margin).
    'positive_only': dict(scale=64.0, m0=0.4, m1=0.2, t=1.0, alpha=0.0,
                          hard_margin=None, easy_margin=False),
}


def npcface_parts(*, scale: float = 64.0, m0: float = 0.4, m1: float = 0.2,
                  t: float = 1.1, alpha: float = 0.25,
                  hard_margin: float | None = None,
                  easy_margin: bool = False) -> MarginParts:
  """NPCFace as MarginParts; the sums are (sum of hard cos, hard count)."""
  m_h = m0 if hard_margin is None else hard_margin

  def row(c_y, state):
    return lax.stop_gradient(cos_add(c_y, m_h))  # the hard threshold

  def negative(c, threshold, is_negative):
    hard = _hard(c, threshold, is_negative)
    # The count is summed in float32 (exact below 2^24 hard negatives per
    # row), like the sum, so that both reduce in one pass.
    sums = (jnp.sum(jnp.where(hard, c, 0.0), axis=-1),
            jnp.sum(jnp.where(hard, 1.0, 0.0), axis=-1))
    return scale * jnp.where(hard, t * c + alpha, c), sums

  def positive(c_y, threshold, sums):
    return scale * arc_positive(c_y, npcface_margin(sums, m0, m1), easy_margin)

  return MarginParts(row, negative, positive)


def npcface_margin(sums, m0: float, m1: float) -> Array:
  """m_i = m0 + m1 * mean hard cos (m0 without hard negatives), constant."""
  hard_sum, num_hard = sums
  return lax.stop_gradient(m0 + m1 * hard_sum / jnp.maximum(num_hard, 1.0))


def npcface_logits(cos: Array, labels: Array, *, scale: float = 64.0,
                   m0: float = 0.4, m1: float = 0.2, t: float = 1.1,
                   alpha: float = 0.25, hard_margin: float | None = None,
                   easy_margin: bool = False, axis_name=None,
                   num_classes: int | None = None,
                   return_diagnostics: bool = False):
  """NPCFace logits (Zeng et al., eqs. 10-12).

  Hard negatives M_ij = [j != y] and [cos_ij > cos(theta_y + hard_margin)]
  (hard_margin None means m0) get s*(t*cos_ij + alpha), the others s*cos_ij.
  The positive gets s*cos(theta_y + m_i) with the cooperative margin
  m_i = m0 + m1 * mean_{j in M_i} cos_ij (m0 without hard negatives) and
  ArcFace's fallback past pi. M and m_i are constants for the gradient.

  Returns logits (B, C) in cos's dtype, and with ``return_diagnostics`` also
  ``{'margin': m_i (B,), 'num_hard': |M_i| (B,)}`` for logging.
  """
  parts = npcface_parts(scale=scale, m0=m0, m1=m1, t=t, alpha=alpha,
                        hard_margin=hard_margin, easy_margin=easy_margin)
  logits, _, sums = assemble(parts, cos, labels, axis_name=axis_name,
                             num_classes=num_classes)
  if return_diagnostics:
    return logits, npcface_diagnostics(sums, m0, m1)
  return logits


def npcface_diagnostics(sums, m0: float, m1: float) -> dict[str, Array]:
  return {'margin': npcface_margin(sums, m0, m1),
          'num_hard': sums[1].astype(jnp.int32)}


# --------------------------------------------------------------------------
# Comparison heads
# --------------------------------------------------------------------------


def softmax_parts(*, scale: float = 64.0) -> MarginParts:
  return MarginParts(lambda c_y, state: (), _plain_negative(scale),
                     lambda c_y, row, sums: scale * c_y)


def softmax_logits(cos: Array, labels: Array, *, scale: float = 64.0,
                   axis_name=None, num_classes: int | None = None) -> Array:
  """Normalised softmax: s*cos for every class (the seed's eq. 1)."""
  return assemble(softmax_parts(scale=scale), cos, labels,
                  axis_name=axis_name, num_classes=num_classes)[0]


def cosface_parts(*, scale: float = 64.0, margin: float = 0.35) -> MarginParts:
  return MarginParts(lambda c_y, state: (), _plain_negative(scale),
                     lambda c_y, row, sums: scale * (c_y - margin))


def cosface_logits(cos: Array, labels: Array, *, scale: float = 64.0,
                   margin: float = 0.35, axis_name=None,
                   num_classes: int | None = None) -> Array:
  """CosFace / AM-softmax: positive s*(cos_y - m)."""
  return assemble(cosface_parts(scale=scale, margin=margin), cos, labels,
                  axis_name=axis_name, num_classes=num_classes)[0]


def arcface_parts(*, scale: float = 64.0, margin: float = 0.5,
                  easy_margin: bool = False) -> MarginParts:
  return MarginParts(
      lambda c_y, state: (), _plain_negative(scale),
      lambda c_y, row, sums: scale * arc_positive(c_y, margin, easy_margin))


def arcface_logits(cos: Array, labels: Array, *, scale: float = 64.0,
                   margin: float = 0.5, easy_margin: bool = False,
                   axis_name=None, num_classes: int | None = None) -> Array:
  """ArcFace: positive s*cos(theta_y + m), monotone fallback past pi."""
  return assemble(arcface_parts(scale=scale, margin=margin,
                                easy_margin=easy_margin),
                  cos, labels, axis_name=axis_name, num_classes=num_classes)[0]


def _chebyshev(c, m: int):
  """T_m(c) = cos(m*arccos(c)) as a polynomial: finite gradient at +-1."""
  prev, cur = jnp.ones_like(c), c
  if m == 0:
    return prev
  for _ in range(m - 1):
    prev, cur = cur, 2 * c * cur - prev
  return cur


def sphereface_init_state() -> dict[str, Array]:
  return {'step': jnp.zeros((), jnp.int32)}


def sphereface_lambda(step, *, base: float = 1000.0, gamma: float = 0.12,
                      power: float = 1.0, lambda_min: float = 5.0):
  """SphereFace's annealing: max(lambda_min, base*(1 + gamma*step)^-power)."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.maximum(lambda_min, base * (1.0 + gamma * step) ** (-power))


def sphereface_parts(*, scale: float = 64.0, margin: int = 4,
                     base: float = 1000.0, gamma: float = 0.12,
                     power: float = 1.0,
                     lambda_min: float = 5.0) -> MarginParts:
  """The row constant is lambda, from the state's step."""
  if int(margin) != margin or margin < 1:
    raise ValueError(f'SphereFace margin must be a positive integer, got '
                     f'{margin}')
  margin = int(margin)

  def row(c_y, state):
    return sphereface_lambda(state['step'], base=base, gamma=gamma,
                             power=power, lambda_min=lambda_min)

  def positive(c_y, lam, sums):
    theta = jnp.arccos(jnp.clip(lax.stop_gradient(c_y), -1.0, 1.0))
    k = jnp.minimum(jnp.floor(margin * theta / math.pi), margin - 1)
    psi = jnp.where(k % 2 == 0, 1.0, -1.0) * _chebyshev(c_y, margin) - 2.0 * k
    return scale * (lam * c_y + psi) / (1.0 + lam)

  return MarginParts(row, _plain_negative(scale), positive)


def sphereface_logits(cos: Array, labels: Array, state: dict[str, Array], *,
                      scale: float = 64.0, margin: int = 4,
                      base: float = 1000.0, gamma: float = 0.12,
                      power: float = 1.0, lambda_min: float = 5.0,
                      axis_name=None, num_classes: int | None = None):
  """SphereFace (A-softmax) on normalised features, with lambda annealing.

  psi(theta) = (-1)^k cos(m*theta) - 2k on [k*pi/m, (k+1)*pi/m]; the positive
  is s*(lambda*cos + psi)/(1 + lambda), lambda decaying with ``state['step']``.
  Returns (logits, new_state).
  """
  parts = sphereface_parts(scale=scale, margin=margin, base=base,
                           gamma=gamma, power=power, lambda_min=lambda_min)
  logits = assemble(parts, cos, labels, state=state, axis_name=axis_name,
                    num_classes=num_classes)[0]
  return logits, {'step': state['step'] + 1}


def adacos_init_state(num_classes: int) -> dict[str, Array]:
  """AdaCos starts at s = sqrt(2) * log(C - 1)."""
  if num_classes < 3:
    raise ValueError(f'AdaCos needs num_classes >= 3, got {num_classes}')
  return {'scale': jnp.asarray(math.sqrt(2.0) * math.log(num_classes - 1),
                               jnp.float32)}


def adacos_logits(cos: Array, labels: Array, state: dict[str, Array], *,
                  axis_name=None, num_classes: int | None = None):
  """AdaCos: no margin, the scale adapted from the batch (state, not a param).

  s_t = log(B_avg) / cos(min(pi/4, median theta_y)), with
  B_avg = mean_i sum_{j != y_i} exp(s_{t-1} cos_ij); logits s_t * cos.
  log(B_avg) is taken as a logsumexp, so no exp overflows. The median is
  over the (global) batch, so call it in the global view, not per data shard.
  Returns (logits, new_state).
  """
  c = _f32(cos)
  cols = class_shards.columns(labels, c.shape[-1], axis_name, num_classes)
  cs = lax.stop_gradient(c)
  s_prev = lax.stop_gradient(state['scale'])
  others = class_shards.negatives(cols.is_target, cols.valid)
  z = jnp.where(others, s_prev * cs, -jnp.inf)
  zmax = jnp.max(z)
  if axis_name is not None:
    zmax = lax.pmax(zmax, axis_name)
  zsum = _psum(jnp.sum(jnp.exp(z - zmax)), axis_name)
  log_b_avg = jnp.log(zsum) + zmax - math.log(c.shape[0])
  c_y = class_shards.take_target(cs, cols, axis_name)
  theta_med = jnp.median(jnp.arccos(jnp.clip(c_y, -1.0, 1.0)))
  s_new = log_b_avg / jnp.cos(jnp.minimum(math.pi / 4, theta_med))
  return finish(s_new * c, cols, cos.dtype), {'scale': s_new}


def adam_init_margins(key: Array, num_classes: int, low: float = 0.3,
                      high: float = 0.4) -> Array:
  """AdaM-softmax's learned per-class margins, FaceX-Zoo's U(0.3, 0.4)."""
  return jax.random.uniform(key, (num_classes,), jnp.float32, low, high)


def adam_project_margins(margins: Array) -> Array:
  """Keeps margins in [0, 1] (apply after each update, as AdaptiveFace does)."""
  return jnp.clip(margins, 0.0, 1.0)


def adam_softmax_logits(cos: Array, labels: Array, margins: Array, *,
                        scale: float = 64.0, lam: float = 70.0,
                        axis_name=None, num_classes: int | None = None):
  """AdaM-softmax (AdaptiveFace): positive s*(cos_y - m_y), m learned per class.

  ``margins`` (C,) is an ordinary parameter (sharded like the classifier's
  rows: (C_local,) per shard). Returns (logits, regulariser) where the
  regulariser -lam * mean(margins) is to be added to the loss so that the
  margins do not collapse to zero.
  """
  c = _f32(cos)
  cols = class_shards.columns(labels, c.shape[-1], axis_name, num_classes)
  m = margins.astype(jnp.float32)[None, :]
  logits = finish(scale * jnp.where(cols.is_target, c - m, c), cols, cos.dtype)
  m_valid = m if cols.valid is None else jnp.where(cols.valid, m, 0.0)
  total = num_classes if num_classes is not None else (
      margins.shape[0] * (1 if axis_name is None else lax.axis_size(axis_name)))
  reg = -lam * _psum(jnp.sum(m_valid), axis_name) / total
  return logits, reg


def _mv_negative(scale, t):
  def negative(c, threshold, is_negative):
    hard = _hard(c, threshold, is_negative)
    return scale * jnp.where(hard, t * c + t - 1.0, c), ()
  return negative


def mv_am_softmax_parts(*, scale: float = 64.0, margin: float = 0.35,
                        t: float = 1.2) -> MarginParts:
  return MarginParts(lambda c_y, state: lax.stop_gradient(c_y - margin),
                     _mv_negative(scale, t),
                     lambda c_y, row, sums: scale * (c_y - margin))


def mv_am_softmax_logits(cos: Array, labels: Array, *, scale: float = 64.0,
                         margin: float = 0.35, t: float = 1.2, axis_name=None,
                         num_classes: int | None = None) -> Array:
  """MV-AM-softmax (the seed's eq. 8): CosFace positive; negatives with
  cos_j > cos_y - m become s*(t*cos_j + t - 1)."""
  return assemble(mv_am_softmax_parts(scale=scale, margin=margin, t=t), cos,
                  labels, axis_name=axis_name, num_classes=num_classes)[0]


def mv_arc_softmax_parts(*, scale: float = 64.0, margin: float = 0.5,
                         t: float = 1.2) -> MarginParts:
  return MarginParts(lambda c_y, state: lax.stop_gradient(cos_add(c_y, margin)),
                     _mv_negative(scale, t),
                     lambda c_y, row, sums: scale * arc_positive(c_y, margin))


def mv_arc_softmax_logits(cos: Array, labels: Array, *, scale: float = 64.0,
                          margin: float = 0.5, t: float = 1.2, axis_name=None,
                          num_classes: int | None = None) -> Array:
  """MV-Arc-softmax: ArcFace positive; negatives with cos_j > cos(theta_y+m)
  become s*(t*cos_j + t - 1)."""
  return assemble(mv_arc_softmax_parts(scale=scale, margin=margin, t=t), cos,
                  labels, axis_name=axis_name, num_classes=num_classes)[0]


def arcnegface_parts(*, scale: float = 64.0, margin: float = 0.5,
                     a: float = 1.2, sigma: float = 2.0) -> MarginParts:
  def negative(c, ref, is_negative):
    g = lax.stop_gradient(a * jnp.exp(-jnp.square(c - ref[:, None]) / sigma))
    return scale * (g * c + g - 1.0), ()

  return MarginParts(lambda c_y, state: lax.stop_gradient(cos_add(c_y, margin)),
                     negative,
                     lambda c_y, row, sums: scale * arc_positive(c_y, margin))


def arcnegface_logits(cos: Array, labels: Array, *, scale: float = 64.0,
                      margin: float = 0.5, a: float = 1.2, sigma: float = 2.0,
                      axis_name=None, num_classes: int | None = None) -> Array:
  """ArcNegFace: ArcFace positive; every negative s*(g*cos_j + g - 1) with
  g = a*exp(-(cos_j - cos(theta_y + m))^2 / sigma), g constant for grad."""
  return assemble(arcnegface_parts(scale=scale, margin=margin, a=a,
                                   sigma=sigma),
                  cos, labels, axis_name=axis_name, num_classes=num_classes)[0]


def curricularface_init_state() -> dict[str, Array]:
  return {'t': jnp.zeros((), jnp.float32)}


def curricularface_parts(*, scale: float = 64.0, margin: float = 0.5,
                         momentum: float = 0.01) -> MarginParts:
  """The row constants are (hard threshold, t); t is the new state."""

  def row(c_y, state):
    t = momentum * jnp.mean(c_y) + (1.0 - momentum) * state['t']
    return lax.stop_gradient((cos_add(c_y, margin), t))

  def negative(c, row, is_negative):
    threshold, t = row
    hard = _hard(c, threshold, is_negative)
    return scale * jnp.where(hard, c * (t + c), c), ()

  return MarginParts(row, negative,
                     lambda c_y, row, sums: scale * arc_positive(c_y, margin))


def curricularface_logits(cos: Array, labels: Array, state: dict[str, Array],
                          *, scale: float = 64.0, margin: float = 0.5,
                          momentum: float = 0.01, axis_name=None,
                          num_classes: int | None = None):
  """CurricularFace: ArcFace positive; hard negatives (cos_j > cos(theta_y+m))
  become s*cos_j*(t + cos_j), t an EMA of the batch's mean cos_y, updated
  before use as in the official code (the batch mean is global: call it in
  the global view). Returns (logits, new_state)."""
  parts = curricularface_parts(scale=scale, margin=margin, momentum=momentum)
  logits, (_, t), _ = assemble(parts, cos, labels, state=state,
                               axis_name=axis_name, num_classes=num_classes)
  return logits, {'t': t}
