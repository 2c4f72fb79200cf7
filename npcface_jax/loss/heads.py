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
  reach ``parts().row`` and ``__call__`` without gradient, except the
  norms of a head with ``norm_gradient`` (MagFace). ``Given.params`` holds
  the head's parameters (SphereFace2's and UniFace's bias), with gradient.
  The key is the same on every class shard, so the shards of one batch
  draw alike; where the batch is also split over 'data', the classifier
  folds each data shard's index into it, so each draws for its own rows
  (per-sample draws then differ from one layout to another; each is a
  valid draw).
- ``one_vs_all`` (SphereFace2, UniFace): the head is its own criterion,
  one binary classification per class, not a softmax (``OneVsAll``,
  ``per_sample_loss``); ``norm_loss(norms)``: a regulariser of the norms
  with gradient (MagFace's g), added in the global view.

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

from npcface_jax.loss import class_shards, criteria

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
  """What a head is given besides cosines (``Head.needs``); None (or {})
  where the head does not need it."""

  # (B,) each sample's embedding norm: without gradient, unless the head
  # sets ``norm_gradient`` (MagFace's margin and regulariser move the norm)
  norms: Array | None = None
  key: Array | None = None  # a PRNG key for this step, the same on shards
  params: dict | None = None  # the head's parameters, with their gradient


class OneVsAll(NamedTuple):
  """A head whose criterion is not a softmax but one binary classification
  per class (SphereFace2, UniFace): each sample's loss is
  ``positive_weight * softplus(-z_y) + negative_weight * sum_{j != y}
  softplus(z_j)`` over its logits z (criteria.one_vs_all_and_top1)."""

  positive_weight: float
  negative_weight: float


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
# The row is constant in c_y for the gradient and the sums are constants;
# the row's gradient reaches only what the head is given with one: its
# parameters (a learnt bias) and, with ``norm_gradient``, the norms.


class MarginParts(NamedTuple):
  row: Callable[[Array, Any, Given], Any]
  negative: Callable[[Array, Any, Array], tuple[Array, tuple[Array, ...]]]
  positive: Callable[[Array, Any, tuple[Array, ...]], Array]
  one_vs_all: OneVsAll | None = None  # None: the softmax cross-entropy


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
  norm_gradient: ClassVar[bool] = False  # the norms keep their gradient

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

  @property
  def one_vs_all(self) -> OneVsAll | None:
    """The head's binary criterion's weights; None for a softmax head."""
    return None

  def per_sample_loss(self, logits: Array, labels: Array, *, axis_name=None
                      ) -> tuple[Array, Array]:
    """Each sample's loss (B,) from the full logits and whether its target
    logit is the largest: the softmax cross-entropy, or the one-vs-all
    binary loss of a head that has one."""
    if self.one_vs_all is None:
      return criteria.cross_entropy_and_top1(logits, labels,
                                             axis_name=axis_name)
    return criteria.one_vs_all_and_top1(logits, labels, self.one_vs_all,
                                        axis_name=axis_name)

  def norm_loss(self, norms: Array) -> Array | None:
    """A regulariser of the embeddings' norms (B,), with gradient, added to
    the loss in the global view (MagFace's g(a)); None: none."""
    return None

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
                                 given=given._replace(params=params),
                                 axis_name=axis_name,
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


# --------------------------------------------------------------------------
# The heads after the paper
# --------------------------------------------------------------------------


def adaface_init_state() -> dict[str, Array]:
  """AdaFace's running norm statistics start at mean 20, std 100, as in
  its official code."""
  return {'norm_mean': jnp.asarray(20.0, jnp.float32),
          'norm_std': jnp.asarray(100.0, jnp.float32)}


@dataclasses.dataclass(frozen=True)
class AdaFace(Head):
  """AdaFace (Kim et al., CVPR 2022, eqs. 11-13): the margin adapts to
  each sample's feature norm, read as image quality.

  z_i = clip(h * (||x_i|| - mu) / (sigma + eps), -1, 1) from the norm
  (clipped to [0.001, 100], without gradient) and running statistics mu,
  sigma of the batch's norms (sigma the unbiased std; each an EMA with
  ``momentum``, updated before use: the state, a statistic of the whole
  batch). The positive is s*(cos(theta_y + g_angle) - g_add) with
  g_angle = -m*z_i and g_add = m + m*z_i, the angle kept in [eps, pi-eps]
  and cos_y clamped to [-1+eps, 1-eps] first (the official code's
  stability clamps; zero gradient past them); negatives s*cos.
  Metrics: 'norm' and the margin scaler 'quality' z_i per sample.
  """

  name: ClassVar[str] = 'adaface'
  needs: ClassVar[frozenset[str]] = frozenset({'norms'})
  batch_statistics: ClassVar[bool] = True
  scale: float = 64.0
  margin: float = 0.4
  h: float = 0.333
  momentum: float = 0.01
  eps: float = 1e-3

  def init_state(self, num_classes):
    return adaface_init_state()

  def parts(self):
    scale, m, eps, alpha = self.scale, self.margin, self.eps, self.momentum

    def row(c_y, state, given):
      norms = jnp.clip(given.norms, 0.001, 100.0)
      mean = alpha * jnp.mean(norms) + (1.0 - alpha) * state['norm_mean']
      std = (alpha * jnp.std(norms, ddof=1)
             + (1.0 - alpha) * state['norm_std'])
      z = jnp.clip(self.h * (norms - mean) / (std + eps), -1.0, 1.0)
      return lax.stop_gradient((z, mean, std, norms))

    def positive(c_y, row, sums):
      z = row[0]
      g_angle, g_add = -m * z, m + m * z
      c = jnp.clip(c_y, -1.0 + eps, 1.0 - eps)
      angle = jnp.arccos(lax.stop_gradient(c)) + g_angle
      inside = (angle > eps) & (angle < math.pi - eps)
      value = jnp.where(inside, cos_add(c, g_angle),
                        jnp.cos(jnp.clip(angle, eps, math.pi - eps)))
      return scale * (value - g_add)

    return MarginParts(row, _plain_negative(scale), positive)

  def after(self, state, row, sums):
    z, mean, std, norms = row
    return {'norm_mean': mean, 'norm_std': std}, {'norm': norms,
                                                  'quality': z}

  def summarize(self, metrics):
    return {'norm': jnp.mean(metrics['norm']),
            'quality': jnp.mean(metrics['quality'])}


@dataclasses.dataclass(frozen=True)
class MagFace(Head):
  """MagFace (Meng et al., CVPR 2021, eqs. 3-5): the margin a linear
  function of the feature norm a = clip(||x||, l_a, u_a),
  m(a) = l_m + (u_m - l_m) * (a - l_a) / (u_a - l_a), positive
  s*cos(theta_y + m(a)) (ArcFace's fallback past pi, or ``easy_margin``),
  negatives s*cos, and the regulariser lambda_g * mean g(a) with
  g(a) = 1/a + a/u_a^2 (``norm_loss``). The norm keeps its gradient through
  both (``norm_gradient``): their balance is what makes the norm a
  quality score. Metrics: 'norm' a and 'margin' m(a) per sample.
  """

  name: ClassVar[str] = 'magface'
  needs: ClassVar[frozenset[str]] = frozenset({'norms'})
  norm_gradient: ClassVar[bool] = True
  scale: float = 64.0
  l_a: float = 10.0
  u_a: float = 110.0
  l_m: float = 0.45
  u_m: float = 0.8
  lambda_g: float = 35.0
  easy_margin: bool = False

  def _norm(self, norms):
    return jnp.clip(norms, self.l_a, self.u_a)

  def parts(self):
    scale, easy = self.scale, self.easy_margin
    slope = (self.u_m - self.l_m) / (self.u_a - self.l_a)

    def row(c_y, state, given):
      a = self._norm(given.norms)
      return self.l_m + slope * (a - self.l_a), a

    return MarginParts(
        row, _plain_negative(scale),
        lambda c_y, row, sums: scale * arc_positive(c_y, row[0], easy))

  def norm_loss(self, norms):
    a = self._norm(norms)
    return self.lambda_g * jnp.mean(1.0 / a + a / self.u_a ** 2)

  def after(self, state, row, sums):
    margin, a = lax.stop_gradient(row)
    return {}, {'margin': margin, 'norm': a}

  def summarize(self, metrics):
    return {'margin': jnp.mean(metrics['margin']),
            'norm': jnp.mean(metrics['norm'])}


def elastic_margins(key: Array, cos_target: Array, mean: float, sigma: float,
                    by_difficulty: bool) -> Array:
  """ElasticFace's per-sample margins, drawn from N(mean, sigma); with
  ``by_difficulty`` (the "+" variants) sorted and handed out by rank, the
  smallest to the sample closest to its class centre (largest cos_y) and
  the largest to the hardest, which needs the whole batch. (The official
  code indexes the sorted margins by the cosines' ranking order instead of
  its inverse; this is the assignment its paper describes.)"""
  margins = mean + sigma * jax.random.normal(key, cos_target.shape)
  if not by_difficulty:
    return margins
  order = jnp.argsort(-lax.stop_gradient(cos_target))
  return jnp.zeros_like(margins).at[order].set(jnp.sort(margins))


@dataclasses.dataclass(frozen=True)
class _Elastic(Head):
  """ElasticFace (Boutros et al., CVPRW 2022): ArcFace's (``angular``)
  or CosFace's margin, drawn per sample from N(margin, sigma) each step
  from the step's key (so a resumed run draws the same); the "+" variants
  assign the drawn margins by difficulty (elastic_margins). The arc
  positive is s*cos(theta_y + m_i), letting the angle pass pi as the
  official code does. Metrics: the drawn 'margin' per sample."""

  needs: ClassVar[frozenset[str]] = frozenset({'key'})
  angular: ClassVar[bool] = True
  by_difficulty: ClassVar[bool] = False
  scale: float = 64.0
  margin: float = 0.5
  sigma: float = 0.05

  def parts(self):
    scale = self.scale

    def row(c_y, state, given):
      return lax.stop_gradient(elastic_margins(
          given.key, c_y, self.margin, self.sigma, self.by_difficulty))

    def positive(c_y, m, sums):
      if self.angular:
        return scale * arc_positive(c_y, m, monotone=False)
      return scale * (c_y - m)

    return MarginParts(row, _plain_negative(scale), positive)

  def after(self, state, row, sums):
    return {}, {'margin': row}

  def summarize(self, metrics):
    return {'margin': jnp.mean(metrics['margin']),
            'margin_std': jnp.std(metrics['margin'])}


@dataclasses.dataclass(frozen=True)
class ElasticArcFace(_Elastic):
  """ElasticFace-Arc: m ~ N(0.5, 0.05)."""

  name: ClassVar[str] = 'elasticface_arc'


@dataclasses.dataclass(frozen=True)
class ElasticCosFace(_Elastic):
  """ElasticFace-Cos: m ~ N(0.35, 0.05)."""

  name: ClassVar[str] = 'elasticface_cos'
  angular: ClassVar[bool] = False
  margin: float = 0.35


@dataclasses.dataclass(frozen=True)
class ElasticArcFacePlus(_Elastic):
  """ElasticFace-Arc+: m ~ N(0.5, 0.0175), assigned by difficulty."""

  name: ClassVar[str] = 'elasticface_arc_plus'
  by_difficulty: ClassVar[bool] = True
  batch_statistics: ClassVar[bool] = True
  sigma: float = 0.0175


@dataclasses.dataclass(frozen=True)
class ElasticCosFacePlus(_Elastic):
  """ElasticFace-Cos+: m ~ N(0.35, 0.02), assigned by difficulty."""

  name: ClassVar[str] = 'elasticface_cos_plus'
  angular: ClassVar[bool] = False
  by_difficulty: ClassVar[bool] = True
  batch_statistics: ClassVar[bool] = True
  margin: float = 0.35
  sigma: float = 0.02


def sphereface2_bias(num_classes: int, scale: float, margin: float, t: float,
                     lam: float) -> float:
  """SphereFace2-C's initial bias (its official code): the b at which the
  loss's gradient balances for a sample at 90 degrees from every class."""
  if num_classes < 2:
    raise ValueError(f'SphereFace2 needs num_classes >= 2, got {num_classes}')
  z = lam / ((1.0 - lam) * (num_classes - 1.0))
  a_y = scale * (2.0 * 0.5 ** t - 1.0 - margin)
  a_i = scale * (2.0 * 0.5 ** t - 1.0 + margin)
  root = math.sqrt((1.0 - z) ** 2 + 4.0 * z * math.exp(a_y - a_i))
  return math.log(2.0 * z) - a_i - math.log(1.0 - z + root)


@dataclasses.dataclass(frozen=True)
class _LearntBias(Head):
  """A head with one learnt bias b (``params['bias']``), every sample's row
  (so that the log shows it: metric 'bias')."""

  @staticmethod
  def _row(c_y, state, given):
    return jnp.broadcast_to(given.params['bias'], c_y.shape)

  def after(self, state, row, sums):
    return {}, {'bias': lax.stop_gradient(row)}

  def summarize(self, metrics):
    return {'bias': jnp.mean(metrics['bias'])}


@dataclasses.dataclass(frozen=True)
class SphereFace2(_LearntBias):
  """SphereFace2-C (Wen et al., ICLR 2022, eqs. 5-10): one binary
  classification per class instead of a softmax (``one_vs_all``). Logits
  z_j = r*(g(cos_j) + m) + b for negatives and r*(g(cos_y) - m) + b for the
  target, with the similarity adjustment g(c) = 2((c + 1)/2)^t - 1 and a
  learnt bias b (``init_params``: sphereface2_bias); the loss is
  (loss_weight / r) * [lam * softplus(-z_y) + (1 - lam) * sum_{j != y}
  softplus(z_j)], as the official code's weighted BCE. With
  ``straight_through`` (the official code) g and m change only the value:
  the gradient in cos is r, as without them.

  Criteria: it is its own criterion. 'softmax' (the mean) and 'ohem' (the
  hardest samples by this loss) reduce it; 'focal' is refused, since
  exp(-loss) is no probability of the target here.
  """

  name: ClassVar[str] = 'sphereface2'
  scale: float = 40.0
  margin: float = 0.4
  t: float = 3.0
  lam: float = 0.7
  loss_weight: float = 50.0
  straight_through: bool = True

  def init_params(self, key, num_classes):
    return {'bias': jnp.asarray(sphereface2_bias(
        num_classes, self.scale, self.margin, self.t, self.lam), jnp.float32)}

  @property
  def one_vs_all(self):
    w = self.loss_weight / self.scale
    return OneVsAll(w * self.lam, w * (1.0 - self.lam))

  def parts(self):
    r, m, t = self.scale, self.margin, self.t

    def adjusted(c, shift):
      g = 2.0 * ((jnp.clip(c, -1.0, 1.0) + 1.0) / 2.0) ** t - 1.0 + shift
      return c + lax.stop_gradient(g - c) if self.straight_through else g

    return MarginParts(
        self._row, lambda c, b, is_negative: (r * adjusted(c, m) + b[:, None],
                                              ()),
        lambda c_y, b, sums: r * adjusted(c_y, -m) + b,
        one_vs_all=self.one_vs_all)


@dataclasses.dataclass(frozen=True)
class UniFace(_LearntBias):
  """UniFace (Zhou et al., ICCV 2023): the unified cross-entropy with a
  margin (UCE-m, the paper's recommended form). Logits s*(cos_y - m) - b for
  the target and s*cos_j - b for the others, with one learnt bias b that
  plays the role of a threshold shared by all samples (``init_params``:
  log(10 * r * C), its official initialisation); the loss is
  softplus(-z_y) + lam * sum_{j != y} softplus(z_j) (``one_vs_all``; lam
  and r are the paper's balancing variants, 1 by default). The official
  code also clamps each logit to [-s, s]; the paper's loss does not.
  Criteria: as SphereFace2's.
  """

  name: ClassVar[str] = 'uniface'
  scale: float = 64.0
  margin: float = 0.4
  lam: float = 1.0
  r: float = 1.0

  def init_params(self, key, num_classes):
    return {'bias': jnp.asarray(math.log(10.0 * self.r * num_classes),
                                jnp.float32)}

  @property
  def one_vs_all(self):
    return OneVsAll(1.0, self.lam)

  def parts(self):
    s, m = self.scale, self.margin
    return MarginParts(
        self._row, lambda c, b, is_negative: (s * c - b[:, None], ()),
        lambda c_y, b, sums: s * (c_y - m) - b,
        one_vs_all=self.one_vs_all)


# The registry: every head by its name (registry.get_head binds options).
HEADS: dict[str, type[Head]] = {
    head.name: head for head in (
        Softmax, SphereFace, CosFace, AMSoftmax, ArcFace, AdaCos, AdaMSoftmax,
        MVAMSoftmax, MVArcSoftmax, ArcNegFace, CurricularFace, NPCFace,
        AdaFace, MagFace, ElasticArcFace, ElasticCosFace, ElasticArcFacePlus,
        ElasticCosFacePlus, SphereFace2, UniFace)}


# --------------------------------------------------------------------------
# The same heads as plain functions (the public API of release 0.1.0)
# --------------------------------------------------------------------------


def _apply(head: type[Head], cos, labels, state=None, params=None, *,
           given: Given = Given(), axis_name=None, num_classes=None,
           **options) -> HeadOutput:
  return head.create(**options)(cos, labels, state, params, given=given,
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


def adaface_logits(cos: Array, labels: Array, norms: Array, state,
                   **options):
  """``AdaFace``'s (logits, new state) from each sample's embedding norm
  (B,) and its running statistics (adaface_init_state())."""
  out = _apply(AdaFace, cos, labels, state, given=Given(norms=norms),
               **options)
  return out.logits, out.state


def magface_logits(cos: Array, labels: Array, norms: Array, **options):
  """``MagFace``'s (logits, norm regulariser lambda_g * mean g(a)); pass
  the norms with their gradient, and add the regulariser to the loss."""
  head = MagFace.create(**options)
  out = head(cos, labels, given=Given(norms=norms))
  return out.logits, head.norm_loss(norms)


def elasticface_logits(cos: Array, labels: Array, key: Array, *,
                       variant: str = 'arc', **options):
  """ElasticFace's (logits, the margins drawn with ``key``) for ``variant``
  'arc', 'cos', 'arc_plus' or 'cos_plus' (``ElasticArcFace``, ...)."""
  name = f'elasticface_{variant}'
  if name not in HEADS:
    raise ValueError(f'unknown ElasticFace variant {variant!r}; choose one '
                     "of 'arc', 'cos', 'arc_plus', 'cos_plus'")
  out = _apply(HEADS[name], cos, labels, given=Given(key=key), **options)
  return out.logits, out.metrics['margin']


def sphereface2_logits(cos: Array, labels: Array, bias: Array, **options):
  """``SphereFace2``'s binary logits; its loss is
  ``criteria.one_vs_all_and_top1(logits, labels, head.one_vs_all)``."""
  return _apply(SphereFace2, cos, labels, None, {'bias': bias},
                **options).logits


def uniface_logits(cos: Array, labels: Array, bias: Array, **options):
  """``UniFace``'s binary logits; its loss as SphereFace2's."""
  return _apply(UniFace, cos, labels, None, {'bias': bias}, **options).logits
