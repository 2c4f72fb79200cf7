"""Margin heads: from cosines to scaled logits, each head one definition.

Every head takes ``cos`` (B, C), the cosines between L2-normalised embeddings
and class weights, and integer ``labels`` (B,), and returns scaled logits of
cos's dtype (arithmetic is float32 inside, so bfloat16 inputs are safe).
State (SphereFace's step, AdaCos's scale, CurricularFace's t) is passed in
and the new state returned; nothing is mutated. Each docstring gives the
head's math, with the paper's equation numbers.

The head protocol
-----------------
A head is a frozen dataclass deriving from ``Head``: its fields are its
options (with the paper's defaults), and it holds its math and every hook a
trainer needs, each with a default for heads that need none of it:

- ``parts()`` -> ``MarginParts``: the head as three pure parts (below), its
  one formula, from which both the full logits (``__call__``, through
  ``assemble``) and the chunked loss (chunked.py) are computed. A head whose
  logits need a pass over all classes first (AdaCos) or parameters
  (AdaM-softmax) has none and overrides ``__call__`` instead.
- ``after(state, row, sums)`` -> (new state, per-sample metrics): what
  follows the parts, on either path (SphereFace counts its step,
  CurricularFace keeps t, NPCFace reports its margins).
- ``init_state(num_classes)``, ``batch_statistics`` (the new state is a
  statistic of the whole batch, so the batch may not be split over shards),
  ``init_params(key, num_classes)``, ``per_class_params`` (parameters with
  one row per class, padded and sharded like the classifier),
  ``project(params)`` (after each optimizer update), ``summarize(metrics)``
  (scalars for the log; ``diagnostics(out)`` adds the state's scalars).
- ``needs``: what else the head is given besides cosines, as ``Given``:
  each sample's embedding ``norms`` (B,) and a PRNG ``key`` for the step.
  The classifier fills them in on every path (full, chunked, class-sharded,
  Partial FC: the norm is per sample, so it travels with the batch); they
  reach ``parts().row`` and ``__call__`` without gradient. The key is the
  same on every shard: where the batch is split over 'data', each shard
  draws for its own rows from it, so per-sample draws differ from one
  layout to another (each is a valid draw; a head that needs them equal
  folds the shard's place in, lax.axis_index).

Adding a head is one class here and its name in ``HEADS``; registry.py
binds names and options, the trainer names no head. The ``*_logits``
functions are the same heads as plain functions, for use from any JAX code.

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

import dataclasses
import math
from typing import Any, Callable, ClassVar, NamedTuple

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


def arc_positive(c_y: Array, m, easy_margin: bool = False, *,
                 monotone: bool = True,
                 straight_through: bool = False) -> Array:
  """ArcFace's positive cosine cos(theta_y + m), unscaled.

  Where theta_y + m > pi the angle would wrap and the logit grow again; there
  ArcFace's monotone fallback cos_y - m*sin(m) is used (``monotone``, the
  original ArcFace and insightface's ArcFace class); ``monotone=False``
  lets it wrap, as arcface_torch's CombinedMarginLoss does. With
  ``easy_margin`` no margin is applied where cos_y <= 0 (insightface's
  easy_margin, which FaceX-Zoo's NPCFace also uses).

  ``straight_through``: the value as above, computed as
  cos(arccos(c_y) + m), but its gradient that of c_y itself (d/dc_y = 1),
  as arcface_torch's CombinedMarginLoss has it (its margin is applied
  under torch.no_grad()); off, the gradient is the margin's own.
  """
  theta = jnp.arccos(jnp.clip(lax.stop_gradient(c_y), -1.0, 1.0))
  # Straight-through computes the value as arcface_torch does (through
  # arccos); its gradient comes from c_y alone, below.
  shifted = jnp.cos(theta + m) if straight_through else cos_add(c_y, m)
  if easy_margin:
    value = jnp.where(lax.stop_gradient(c_y) > 0, shifted, c_y)
  elif monotone:
    value = jnp.where(theta + m > math.pi, c_y - m * jnp.sin(m), shifted)
  else:
    value = shifted
  if straight_through:
    # The value exactly (0 + value), with c_y's gradient.
    return (c_y - lax.stop_gradient(c_y)) + lax.stop_gradient(value)
  return value


def finish(logits: Array, cols: class_shards.Columns, dtype) -> Array:
  """Masks padding columns to -inf and casts back to the input dtype."""
  if cols.valid is not None:
    logits = jnp.where(cols.valid, logits, -jnp.inf)
  return logits.astype(dtype)


def _f32(cos: Array) -> Array:
  return cos.astype(jnp.promote_types(cos.dtype, jnp.float32))


class Given(NamedTuple):
  """What a head may be given besides cosines (``Head.needs``), without
  gradient; None where the head does not need it."""

  norms: Array | None = None  # (B,) each sample's embedding norm
  key: Array | None = None  # a PRNG key for this step


class HeadOutput(NamedTuple):
  logits: Array
  state: dict[str, Array]  # the head's new state ({} for stateless heads)
  aux_loss: Array  # added to the criterion (AdaM-softmax's regulariser), else 0
  metrics: dict[str, Array]  # per-sample diagnostics (NPCFace), else {}


# --------------------------------------------------------------------------
# Margin heads as three parts
# --------------------------------------------------------------------------
#
# A head's math is written once, as three pure parts, so that it serves both
# the full (B, C) logits and the chunked fused cross-entropy
# (npcface_jax.loss.chunked), which never holds all logits at once:
#   row(c_y, state, given) -> per-sample constants from the target cosines
#       (B,), the head's state and what it is given (passed in, never
#       closed over, so that traced values work under jit and custom_vjp);
#   negative(c, row, is_negative) -> (scaled logits of a block of columns,
#       per-sample partial sums over that block's negatives, a tuple);
#   positive(c_y, row, sums) -> the scaled target logit (B,).
# The logits' Jacobian in cos is diagonal (masks, margins and batch
# statistics are constants for the gradient), which the fused path relies on.


class MarginParts(NamedTuple):
  row: Callable[[Array, Any, Given], Any]
  negative: Callable[[Array, Any, Array], tuple[Array, tuple[Array, ...]]]
  positive: Callable[[Array, Any, tuple[Array, ...]], Array]


def assemble(parts: MarginParts, cos: Array, labels: Array, *, state=None,
             given: Given = Given(), axis_name=None,
             num_classes: int | None = None):
  """Full logits (B, C) in cos's dtype, with the row constants and sums."""
  c = _f32(cos)
  cols = class_shards.columns(labels, c.shape[-1], axis_name, num_classes)
  c_y = class_shards.take_target(c, cols, axis_name)
  row = parts.row(c_y, state, given)
  is_negative = class_shards.negatives(cols.is_target, cols.valid)
  negative, sums = parts.negative(c, row, is_negative)
  sums = _psum(sums, axis_name)
  positive = parts.positive(c_y, row, sums)
  logits = jnp.where(cols.is_target, positive[:, None], negative)
  return finish(logits, cols, cos.dtype), row, sums


def _no_row(c_y, state, given):
  return ()


def _plain_negative(scale):
  return lambda c, row, is_negative: (scale * c, ())


def _hard(c, threshold, is_negative):
  """M_ij = [j != y_i] and [cos_ij > threshold_i], constant for the grad."""
  return lax.stop_gradient((c > threshold[:, None]) & is_negative)


# --------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Head:
  """A head bound to its options (its fields); the module docstring gives
  the protocol. Subclasses set ``name`` and define ``parts`` or
  ``__call__``, and whichever hooks they need."""

  name: ClassVar[str] = ''
  batch_statistics: ClassVar[bool] = False
  per_class_params: ClassVar[frozenset[str]] = frozenset()
  needs: ClassVar[frozenset[str]] = frozenset()  # of Given's fields

  @classmethod
  def create(cls, **options) -> Head:
    """The head with these options; ValueError naming an unknown one."""
    fields = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(options) - set(fields))
    if unknown:
      raise ValueError(f'head {cls.name!r} has no option(s) {unknown}; its '
                       f'options are {fields}')
    return cls(**options)

  @property
  def options(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def parts(self) -> MarginParts:
    raise ValueError(
        f'head {self.name!r} has no chunked form (its logits need a pass '
        f'over all classes first, or it has parameters); use the full '
        f'logits for it (chunk_size=None)')

  @property
  def has_parts(self) -> bool:
    """Whether the head can run as the chunked loss (chunked.py)."""
    return type(self).parts is not Head.parts

  def after(self, state, row, sums) -> tuple[dict, dict]:
    """The new state and per-sample metrics from the parts' row and sums."""
    return {}, {}

  def init_state(self, num_classes: int) -> dict[str, Array]:
    return {}

  def init_params(self, key: Array, num_classes: int) -> dict[str, Array]:
    return {}

  def project(self, params: dict) -> dict:
    """The parameters after an optimizer update, put back where they are
    allowed to be."""
    return params

  def summarize(self, metrics: dict) -> dict[str, Array]:
    """Per-sample metrics -> named scalars for the training log."""
    return {}

  def diagnostics(self, out: HeadOutput) -> dict[str, Array]:
    """Scalars to log: '<head>/<name>' from the per-sample metrics, and
    'head/<key>' for each scalar of the head's state (AdaCos's scale)."""
    found = {f'{self.name}/{k}': v
             for k, v in self.summarize(out.metrics).items()}
    found.update({f'head/{k}': jnp.asarray(v, jnp.float32)
                  for k, v in out.state.items() if jnp.ndim(v) == 0})
    return found

  def __call__(self, cos: Array, labels: Array, state=None, params=None, *,
               given: Given = Given(), axis_name=None,
               num_classes: int | None = None) -> HeadOutput:
    logits, row, sums = assemble(self.parts(), cos, labels, state=state,
                                 given=given, axis_name=axis_name,
                                 num_classes=num_classes)
    new_state, metrics = self.after(state, row, sums)
    return HeadOutput(logits, new_state, jnp.zeros((), jnp.float32), metrics)


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


def npcface_margin(sums, m0: float, m1: float) -> Array:
  """m_i = m0 + m1 * mean hard cos (m0 without hard negatives), constant."""
  hard_sum, num_hard = sums
  return lax.stop_gradient(m0 + m1 * hard_sum / jnp.maximum(num_hard, 1.0))


@dataclasses.dataclass(frozen=True)
class NPCFace(Head):
  """NPCFace (Zeng et al., eqs. 10-12).

  Hard negatives M_ij = [j != y] and [cos_ij > cos(theta_y + hard_margin)]
  (hard_margin None means m0) get s*(t*cos_ij + alpha), the others s*cos_ij.
  The positive gets s*cos(theta_y + m_i) with the cooperative margin
  m_i = m0 + m1 * mean_{j in M_i} cos_ij (m0 without hard negatives) and
  ArcFace's fallback past pi. M and m_i are constants for the gradient.
  Metrics: 'margin' m_i and 'num_hard' |M_i| per sample. Also takes
  ``preset=`` (NPCFACE_PRESETS), the named option sets.
  """

  name: ClassVar[str] = 'npcface'
  scale: float = 64.0
  m0: float = 0.4
  m1: float = 0.2
  t: float = 1.1
  alpha: float = 0.25
  hard_margin: float | None = None
  easy_margin: bool = False

  @classmethod
  def create(cls, **options) -> Head:
    if 'preset' in options:
      preset = options.pop('preset')
      if preset not in NPCFACE_PRESETS:
        raise ValueError(f'unknown NPCFace preset {preset!r}; choose one of '
                         f'{sorted(NPCFACE_PRESETS)}')
      options = {**NPCFACE_PRESETS[preset], **options}
    return super().create(**options)

  def parts(self) -> MarginParts:
    """The sums are (sum of hard cos, hard count)."""
    scale, t, alpha = self.scale, self.t, self.alpha
    m_h = self.m0 if self.hard_margin is None else self.hard_margin

    def row(c_y, state, given):
      return lax.stop_gradient(cos_add(c_y, m_h))  # the hard threshold

    def negative(c, threshold, is_negative):
      hard = _hard(c, threshold, is_negative)
      # The count is summed in float32 (exact below 2^24 hard negatives per
      # row), like the sum, so that both reduce in one pass.
      sums = (jnp.sum(jnp.where(hard, c, 0.0), axis=-1),
              jnp.sum(jnp.where(hard, 1.0, 0.0), axis=-1))
      return scale * jnp.where(hard, t * c + alpha, c), sums

    def positive(c_y, threshold, sums):
      margin = npcface_margin(sums, self.m0, self.m1)
      return scale * arc_positive(c_y, margin, self.easy_margin)

    return MarginParts(row, negative, positive)

  def after(self, state, row, sums):
    return {}, {'margin': npcface_margin(sums, self.m0, self.m1),
                'num_hard': sums[1].astype(jnp.int32)}

  def summarize(self, metrics):
    # samples with a hard negative, hard negatives per sample, and the mean
    # cooperative margin
    num_hard = metrics['num_hard']
    return {'hard_share': jnp.mean((num_hard > 0).astype(jnp.float32)),
            'hard_count': jnp.mean(num_hard.astype(jnp.float32)),
            'margin': jnp.mean(metrics['margin'])}


# --------------------------------------------------------------------------
# Comparison heads
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Softmax(Head):
  """Normalised softmax: s*cos for every class (the seed's eq. 1)."""

  name: ClassVar[str] = 'softmax'
  scale: float = 64.0

  def parts(self):
    scale = self.scale
    return MarginParts(_no_row, _plain_negative(scale),
                       lambda c_y, row, sums: scale * c_y)


@dataclasses.dataclass(frozen=True)
class CosFace(Head):
  """CosFace / AM-softmax: positive s*(cos_y - m)."""

  name: ClassVar[str] = 'cosface'
  scale: float = 64.0
  margin: float = 0.35

  def parts(self):
    scale, margin = self.scale, self.margin
    return MarginParts(_no_row, _plain_negative(scale),
                       lambda c_y, row, sums: scale * (c_y - margin))


@dataclasses.dataclass(frozen=True)
class AMSoftmax(CosFace):
  """AM-softmax: CosFace under its other name."""

  name: ClassVar[str] = 'am_softmax'


@dataclasses.dataclass(frozen=True)
class ArcFace(Head):
  """ArcFace: positive s*cos(theta_y + m), monotone fallback past pi.

  arcface_torch's CombinedMarginLoss (its train_v2.py's ArcFace) is
  ``monotone=False, straight_through=True``: no fallback (the angle
  wraps past pi) and the margin applied without gradient (arc_positive).
  """

  name: ClassVar[str] = 'arcface'
  scale: float = 64.0
  margin: float = 0.5
  easy_margin: bool = False
  monotone: bool = True
  straight_through: bool = False

  def parts(self):
    scale, margin, easy = self.scale, self.margin, self.easy_margin
    kw = {'monotone': self.monotone, 'straight_through': self.straight_through}
    return MarginParts(
        _no_row, _plain_negative(scale),
        lambda c_y, row, sums: scale * arc_positive(c_y, margin, easy, **kw))


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


@dataclasses.dataclass(frozen=True)
class SphereFace(Head):
  """SphereFace (A-softmax) on normalised features, with lambda annealing.

  psi(theta) = (-1)^k cos(m*theta) - 2k on [k*pi/m, (k+1)*pi/m]; the positive
  is s*(lambda*cos + psi)/(1 + lambda), lambda decaying with the state's
  step (the row constant), which counts the calls.
  """

  name: ClassVar[str] = 'sphereface'
  scale: float = 64.0
  margin: int = 4
  base: float = 1000.0
  gamma: float = 0.12
  power: float = 1.0
  lambda_min: float = 5.0

  def __post_init__(self):
    if int(self.margin) != self.margin or self.margin < 1:
      raise ValueError(f'SphereFace margin must be a positive integer, got '
                       f'{self.margin}')

  def init_state(self, num_classes):
    return sphereface_init_state()

  def parts(self):
    scale, margin = self.scale, int(self.margin)

    def row(c_y, state, given):
      return sphereface_lambda(state['step'], base=self.base,
                               gamma=self.gamma, power=self.power,
                               lambda_min=self.lambda_min)

    def positive(c_y, lam, sums):
      theta = jnp.arccos(jnp.clip(lax.stop_gradient(c_y), -1.0, 1.0))
      k = jnp.minimum(jnp.floor(margin * theta / math.pi), margin - 1)
      psi = (jnp.where(k % 2 == 0, 1.0, -1.0) * _chebyshev(c_y, margin)
             - 2.0 * k)
      return scale * (lam * c_y + psi) / (1.0 + lam)

    return MarginParts(row, _plain_negative(scale), positive)

  def after(self, state, row, sums):
    return {'step': state['step'] + 1}, {}


def adacos_init_state(num_classes: int) -> dict[str, Array]:
  """AdaCos starts at s = sqrt(2) * log(C - 1)."""
  if num_classes < 3:
    raise ValueError(f'AdaCos needs num_classes >= 3, got {num_classes}')
  return {'scale': jnp.asarray(math.sqrt(2.0) * math.log(num_classes - 1),
                               jnp.float32)}


@dataclasses.dataclass(frozen=True)
class AdaCos(Head):
  """AdaCos: no margin, the scale adapted from the batch (state, not a param).

  s_t = log(B_avg) / cos(min(pi/4, median theta_y)), with
  B_avg = mean_i sum_{j != y_i} exp(s_{t-1} cos_ij); logits s_t * cos.
  log(B_avg) is taken as a logsumexp, so no exp overflows. The median is
  over the (global) batch, so it runs in the global view, not per data
  shard (``batch_statistics``); no chunked form.
  """

  name: ClassVar[str] = 'adacos'
  batch_statistics: ClassVar[bool] = True

  def init_state(self, num_classes):
    return adacos_init_state(num_classes)

  def __call__(self, cos, labels, state=None, params=None, *, given=Given(),
               axis_name=None, num_classes=None) -> HeadOutput:
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
    return HeadOutput(finish(s_new * c, cols, cos.dtype), {'scale': s_new},
                      jnp.zeros((), jnp.float32), {})


def adam_init_margins(key: Array, num_classes: int, low: float = 0.3,
                      high: float = 0.4) -> Array:
  """AdaM-softmax's learned per-class margins, FaceX-Zoo's U(0.3, 0.4)."""
  return jax.random.uniform(key, (num_classes,), jnp.float32, low, high)


def adam_project_margins(margins: Array) -> Array:
  """Keeps margins in [0, 1] (apply after each update, as AdaptiveFace does)."""
  return jnp.clip(margins, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class AdaMSoftmax(Head):
  """AdaM-softmax (AdaptiveFace): positive s*(cos_y - m_y), m learned per
  class.

  ``params['margins']`` (C,) is an ordinary parameter (sharded like the
  classifier's rows: (C_local,) per shard), kept in [0, 1] by ``project``;
  the regulariser -lam * mean(margins) is the output's ``aux_loss``, added
  to the loss so that the margins do not collapse to zero. No chunked form.
  """

  name: ClassVar[str] = 'adam_softmax'
  per_class_params: ClassVar[frozenset[str]] = frozenset({'margins'})
  scale: float = 64.0
  lam: float = 70.0

  def init_params(self, key, num_classes):
    return {'margins': adam_init_margins(key, num_classes)}

  def project(self, params):
    return {'margins': adam_project_margins(params['margins'])}

  def __call__(self, cos, labels, state=None, params=None, *, given=Given(),
               axis_name=None, num_classes=None) -> HeadOutput:
    margins = params['margins']
    c = _f32(cos)
    cols = class_shards.columns(labels, c.shape[-1], axis_name, num_classes)
    m = margins.astype(jnp.float32)[None, :]
    logits = finish(self.scale * jnp.where(cols.is_target, c - m, c), cols,
                    cos.dtype)
    m_valid = m if cols.valid is None else jnp.where(cols.valid, m, 0.0)
    total = num_classes if num_classes is not None else (
        margins.shape[0]
        * (1 if axis_name is None else lax.axis_size(axis_name)))
    reg = -self.lam * _psum(jnp.sum(m_valid), axis_name) / total
    return HeadOutput(logits, {}, reg, {})


def _mv_negative(scale, t):
  def negative(c, threshold, is_negative):
    hard = _hard(c, threshold, is_negative)
    return scale * jnp.where(hard, t * c + t - 1.0, c), ()
  return negative


@dataclasses.dataclass(frozen=True)
class MVAMSoftmax(Head):
  """MV-AM-softmax (the seed's eq. 8): CosFace positive; negatives with
  cos_j > cos_y - m become s*(t*cos_j + t - 1)."""

  name: ClassVar[str] = 'mv_am_softmax'
  scale: float = 64.0
  margin: float = 0.35
  t: float = 1.2

  def parts(self):
    scale, margin = self.scale, self.margin
    return MarginParts(
        lambda c_y, state, given: lax.stop_gradient(c_y - margin),
        _mv_negative(scale, self.t),
        lambda c_y, row, sums: scale * (c_y - margin))


@dataclasses.dataclass(frozen=True)
class MVArcSoftmax(Head):
  """MV-Arc-softmax: ArcFace positive; negatives with cos_j > cos(theta_y+m)
  become s*(t*cos_j + t - 1)."""

  name: ClassVar[str] = 'mv_arc_softmax'
  scale: float = 64.0
  margin: float = 0.5
  t: float = 1.2

  def parts(self):
    scale, margin = self.scale, self.margin
    return MarginParts(
        lambda c_y, state, given: lax.stop_gradient(cos_add(c_y, margin)),
        _mv_negative(scale, self.t),
        lambda c_y, row, sums: scale * arc_positive(c_y, margin))


@dataclasses.dataclass(frozen=True)
class ArcNegFace(Head):
  """ArcNegFace: ArcFace positive; every negative s*(g*cos_j + g - 1) with
  g = a*exp(-(cos_j - cos(theta_y + m))^2 / sigma), g constant for grad."""

  name: ClassVar[str] = 'arcnegface'
  scale: float = 64.0
  margin: float = 0.5
  a: float = 1.2
  sigma: float = 2.0

  def parts(self):
    scale, margin, a, sigma = self.scale, self.margin, self.a, self.sigma

    def negative(c, ref, is_negative):
      g = lax.stop_gradient(a * jnp.exp(-jnp.square(c - ref[:, None]) / sigma))
      return scale * (g * c + g - 1.0), ()

    return MarginParts(
        lambda c_y, state, given: lax.stop_gradient(cos_add(c_y, margin)),
        negative, lambda c_y, row, sums: scale * arc_positive(c_y, margin))


def curricularface_init_state() -> dict[str, Array]:
  return {'t': jnp.zeros((), jnp.float32)}


@dataclasses.dataclass(frozen=True)
class CurricularFace(Head):
  """CurricularFace: ArcFace positive; hard negatives (cos_j >
  cos(theta_y+m)) become s*cos_j*(t + cos_j), t an EMA of the batch's mean
  cos_y, updated before use as in the official code (the batch mean is
  global: ``batch_statistics``). The row constants are (hard threshold, t);
  t is the new state."""

  name: ClassVar[str] = 'curricularface'
  batch_statistics: ClassVar[bool] = True
  scale: float = 64.0
  margin: float = 0.5
  momentum: float = 0.01

  def init_state(self, num_classes):
    return curricularface_init_state()

  def parts(self):
    scale, margin, momentum = self.scale, self.margin, self.momentum

    def row(c_y, state, given):
      t = momentum * jnp.mean(c_y) + (1.0 - momentum) * state['t']
      return lax.stop_gradient((cos_add(c_y, margin), t))

    def negative(c, row, is_negative):
      threshold, t = row
      hard = _hard(c, threshold, is_negative)
      return scale * jnp.where(hard, c * (t + c), c), ()

    return MarginParts(row, negative,
                       lambda c_y, row, sums: scale * arc_positive(c_y, margin))

  def after(self, state, row, sums):
    return {'t': row[1]}, {}


# The registry: every head by its name (registry.get_head binds options).
HEADS: dict[str, type[Head]] = {
    head.name: head for head in (
        Softmax, SphereFace, CosFace, AMSoftmax, ArcFace, AdaCos, AdaMSoftmax,
        MVAMSoftmax, MVArcSoftmax, ArcNegFace, CurricularFace, NPCFace)}


# --------------------------------------------------------------------------
# The same heads as plain functions (the public API of release 0.1.0)
# --------------------------------------------------------------------------


def _apply(head: type[Head], cos, labels, state=None, params=None, *,
           axis_name=None, num_classes=None, **options) -> HeadOutput:
  return head.create(**options)(cos, labels, state, params,
                                axis_name=axis_name, num_classes=num_classes)


def npcface_logits(cos: Array, labels: Array, *, return_diagnostics=False,
                   **options):
  """NPCFace logits (B, C) in cos's dtype (``NPCFace``: options, math);
  with ``return_diagnostics`` also ``{'margin': m_i (B,), 'num_hard':
  |M_i| (B,)}``."""
  out = _apply(NPCFace, cos, labels, **options)
  return (out.logits, out.metrics) if return_diagnostics else out.logits


def softmax_logits(cos: Array, labels: Array, **options) -> Array:
  """``Softmax``'s logits."""
  return _apply(Softmax, cos, labels, **options).logits


def cosface_logits(cos: Array, labels: Array, **options) -> Array:
  """``CosFace``'s logits (AM-softmax)."""
  return _apply(CosFace, cos, labels, **options).logits


def arcface_logits(cos: Array, labels: Array, **options) -> Array:
  """``ArcFace``'s logits."""
  return _apply(ArcFace, cos, labels, **options).logits


def mv_am_softmax_logits(cos: Array, labels: Array, **options) -> Array:
  """``MVAMSoftmax``'s logits."""
  return _apply(MVAMSoftmax, cos, labels, **options).logits


def mv_arc_softmax_logits(cos: Array, labels: Array, **options) -> Array:
  """``MVArcSoftmax``'s logits."""
  return _apply(MVArcSoftmax, cos, labels, **options).logits


def arcnegface_logits(cos: Array, labels: Array, **options) -> Array:
  """``ArcNegFace``'s logits."""
  return _apply(ArcNegFace, cos, labels, **options).logits


def sphereface_logits(cos: Array, labels: Array, state, **options):
  """``SphereFace``'s (logits, new state)."""
  out = _apply(SphereFace, cos, labels, state, **options)
  return out.logits, out.state


def adacos_logits(cos: Array, labels: Array, state, **options):
  """``AdaCos``'s (logits, new state)."""
  out = _apply(AdaCos, cos, labels, state, **options)
  return out.logits, out.state


def curricularface_logits(cos: Array, labels: Array, state, **options):
  """``CurricularFace``'s (logits, new state)."""
  out = _apply(CurricularFace, cos, labels, state, **options)
  return out.logits, out.state


def adam_softmax_logits(cos: Array, labels: Array, margins: Array, **options):
  """``AdaMSoftmax``'s (logits, regulariser)."""
  out = _apply(AdaMSoftmax, cos, labels, None, {'margins': margins},
               **options)
  return out.logits, out.aux_loss
