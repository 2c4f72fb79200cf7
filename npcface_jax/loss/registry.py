"""Heads and criteria by name, behind one calling convention for the trainer.

A config says ``head='npcface'`` (with ``head_options`` such as
``{'preset': 'facex_zoo'}`` or single fields) and ``criterion='focal'``;
``get_head`` and ``get_criterion`` check the names and options up front, so a
typo fails before anything compiles, and return callables that hide which
heads carry state or parameters:

    head = get_head('curricularface', margin=0.5)
    state = head.init_state(num_classes)              # {} when stateless
    params = head.init_params(key, num_classes)       # {} unless AdaM-softmax
    out = head(cos, labels, state, params)            # HeadOutput
    loss = get_criterion('softmax')(out.logits, labels) + out.aux_loss

and what a trainer needs to treat every head alike: ``head.project(params)``
after each update (AdaM-softmax keeps its margins in [0, 1]),
``head.per_class_params`` (parameters with one row per class, laid out like
the classifier) and ``head.diagnostics(out)`` (scalars worth logging).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from npcface_jax.loss import criteria, heads

Array = jax.Array


class HeadOutput(NamedTuple):
  logits: Array
  state: dict[str, Array]  # the head's new state ({} for stateless heads)
  aux_loss: Array  # added to the criterion (AdaM-softmax's regulariser), else 0
  metrics: dict[str, Array]  # per-sample diagnostics (NPCFace), else {}


_NO_STATE = lambda num_classes: {}  # noqa: E731
_NO_PARAMS = lambda key, num_classes: {}  # noqa: E731
_NOTHING_AFTER = lambda state, row, sums, options: ({}, {})  # noqa: E731
_AS_IS = lambda params: params  # noqa: E731
_NO_DIAGNOSTICS = lambda metrics: {}  # noqa: E731


@dataclasses.dataclass(frozen=True)
class _Entry:
  fn: Callable[..., Any]
  # What the fn takes after labels and returns: 'plain' (logits), 'state'
  # (state -> logits, state), 'params' (margins -> logits, regulariser) or
  # 'diagnostics' (logits and per-sample diagnostics).
  kind: str
  init_state: Callable[[int], dict] = _NO_STATE
  init_params: Callable[[Array, int], dict] = _NO_PARAMS
  # (**options) -> MarginParts, for the chunked loss; None if the head has
  # no such form.
  parts: Callable[..., heads.MarginParts] | None = None
  # (state, row, sums, options) -> (new state, metrics) on the chunked path.
  after_parts: Callable[..., tuple[dict, dict]] = _NOTHING_AFTER
  # Whether the new state is a statistic of the whole batch (AdaCos's
  # median, CurricularFace's mean), so the batch must not be split.
  batch_statistics: bool = False
  # params -> params, applied after each optimizer update.
  project: Callable[[dict], dict] = _AS_IS
  # The params with one row per class (padded and sharded as the classifier).
  per_class_params: tuple[str, ...] = ()
  # Per-sample metrics -> named scalars for the training log.
  summarize: Callable[[dict], dict] = _NO_DIAGNOSTICS


_HEADS: dict[str, _Entry] = {
    'softmax': _Entry(heads.softmax_logits, 'plain',
                      parts=heads.softmax_parts),
    'sphereface': _Entry(
        heads.sphereface_logits, 'state',
        lambda n: heads.sphereface_init_state(),
        parts=heads.sphereface_parts,
        after_parts=lambda st, row, sums, o: ({'step': st['step'] + 1}, {})),
    'cosface': _Entry(heads.cosface_logits, 'plain',
                      parts=heads.cosface_parts),
    'am_softmax': _Entry(heads.cosface_logits, 'plain',
                         parts=heads.cosface_parts),
    'arcface': _Entry(heads.arcface_logits, 'plain',
                      parts=heads.arcface_parts),
    'adacos': _Entry(heads.adacos_logits, 'state', heads.adacos_init_state,
                     batch_statistics=True),
    'adam_softmax': _Entry(
        heads.adam_softmax_logits, 'params',
        init_params=lambda key, n: {'margins': heads.adam_init_margins(key, n)},
        project=lambda p: {'margins': heads.adam_project_margins(p['margins'])},
        per_class_params=('margins',)),
    'mv_am_softmax': _Entry(heads.mv_am_softmax_logits, 'plain',
                            parts=heads.mv_am_softmax_parts),
    'mv_arc_softmax': _Entry(heads.mv_arc_softmax_logits, 'plain',
                             parts=heads.mv_arc_softmax_parts),
    'arcnegface': _Entry(heads.arcnegface_logits, 'plain',
                         parts=heads.arcnegface_parts),
    'curricularface': _Entry(
        heads.curricularface_logits, 'state',
        lambda n: heads.curricularface_init_state(),
        parts=heads.curricularface_parts,
        after_parts=lambda st, row, sums, o: ({'t': row[1]}, {}),
        batch_statistics=True),
    'npcface': _Entry(
        heads.npcface_logits, 'diagnostics',
        parts=heads.npcface_parts,
        after_parts=lambda st, row, sums, o: (
            {}, heads.npcface_diagnostics(sums, o['m0'], o['m1'])),
        summarize=lambda m: {
            # samples with a hard negative, hard negatives per sample, and
            # the mean cooperative margin
            'hard_share': jnp.mean((m['num_hard'] > 0).astype(jnp.float32)),
            'hard_count': jnp.mean(m['num_hard'].astype(jnp.float32)),
            'margin': jnp.mean(m['margin'])}),
}

# Each criterion is a reduction of the per-sample cross-entropy.
_CRITERIA: dict[str, Callable[..., Array]] = {
    'softmax': lambda ce: jnp.mean(ce),
    'focal': criteria.focal_reduce,
    'ohem': criteria.ohem_reduce,
}

# Arguments the registry passes itself; not options a config may set.
_RESERVED = {'cos', 'ce', 'labels', 'state', 'margins', 'axis_name',
             'num_classes', 'return_diagnostics'}


def head_names() -> list[str]:
  return sorted(_HEADS)


def criterion_names() -> list[str]:
  return sorted(_CRITERIA)


def _options(kind: str, name: str, fn, options: dict[str, Any]):
  """The options checked against fn's keywords, with its defaults filled in."""
  params = {p.name: p for p in inspect.signature(fn).parameters.values()
            if p.name not in _RESERVED}
  unknown = sorted(set(options) - set(params))
  if unknown:
    raise ValueError(f'{kind} {name!r} has no option(s) {unknown}; '
                     f'its options are {sorted(params)}')
  defaults = {k: p.default for k, p in params.items()
              if p.default is not inspect.Parameter.empty}
  return {**defaults, **options}


@dataclasses.dataclass(frozen=True)
class Head:
  """A head bound to its options, with the uniform call of HeadOutput."""

  name: str
  options: dict[str, Any]
  _entry: _Entry

  def init_state(self, num_classes: int) -> dict[str, Array]:
    return self._entry.init_state(num_classes)

  def init_params(self, key: Array, num_classes: int) -> dict[str, Array]:
    return self._entry.init_params(key, num_classes)

  @property
  def batch_statistics(self) -> bool:
    """Whether the state update needs the whole batch in one place."""
    return self._entry.batch_statistics

  @property
  def has_parts(self) -> bool:
    """Whether the head can run as the chunked loss (chunked.py)."""
    return self._entry.parts is not None

  def parts(self) -> heads.MarginParts:
    if not self.has_parts:
      raise ValueError(
          f'head {self.name!r} has no chunked form (its logits need a pass '
          f'over all classes first, or it has parameters); use the full '
          f'logits for it (chunk_size=None)')
    return self._entry.parts(**self.options)

  def project(self, params: dict) -> dict:
    """The head's parameters after an optimizer update, put back where they
    are allowed to be."""
    return self._entry.project(params)

  @property
  def per_class_params(self) -> frozenset[str]:
    """Names of the parameters with one row per class."""
    return frozenset(self._entry.per_class_params)

  def diagnostics(self, out: HeadOutput) -> dict[str, Array]:
    """Scalars to log: '<head>/<name>' from the per-sample metrics, and
    'head/<key>' for each scalar of the head's state (AdaCos's scale)."""
    found = {f'{self.name}/{k}': v
             for k, v in self._entry.summarize(out.metrics).items()}
    found.update({f'head/{k}': jnp.asarray(v, jnp.float32)
                  for k, v in out.state.items() if jnp.ndim(v) == 0})
    return found

  def after_parts(self, state, row, sums) -> tuple[dict, dict]:
    """The new state and metrics from the chunked loss's row and sums."""
    return self._entry.after_parts(state, row, sums, self.options)

  def __call__(self, cos: Array, labels: Array, state=None, params=None, *,
               axis_name=None, num_classes: int | None = None) -> HeadOutput:
    fn = functools.partial(self._entry.fn, axis_name=axis_name,
                           num_classes=num_classes, **self.options)
    zero = jnp.zeros((), jnp.float32)
    kind = self._entry.kind
    if kind == 'diagnostics':
      logits, diag = fn(cos, labels, return_diagnostics=True)
      return HeadOutput(logits, {}, zero, diag)
    if kind == 'plain':
      return HeadOutput(fn(cos, labels), {}, zero, {})
    if kind == 'state':
      logits, new_state = fn(cos, labels, state)
      return HeadOutput(logits, new_state, zero, {})
    logits, reg = fn(cos, labels, params['margins'])
    return HeadOutput(logits, {}, reg, {})


def get_head(name: str, **options) -> Head:
  """The head called ``name``; NPCFace also takes ``preset=``
  (NPCFACE_PRESETS)."""
  if name not in _HEADS:
    raise ValueError(f'unknown head {name!r}; choose one of {head_names()}')
  options = dict(options)
  if name == 'npcface' and 'preset' in options:
    preset = options.pop('preset')
    if preset not in heads.NPCFACE_PRESETS:
      raise ValueError(f'unknown NPCFace preset {preset!r}; choose one of '
                       f'{sorted(heads.NPCFACE_PRESETS)}')
    options = {**heads.NPCFACE_PRESETS[preset], **options}
  return Head(name, _options('head', name, _HEADS[name].fn, options),
              _HEADS[name])


@dataclasses.dataclass(frozen=True)
class Criterion:
  """A criterion bound to its options.

  ``criterion(logits, labels, axis_name=..., num_classes=...)`` is the loss;
  ``criterion.reduce(ce)`` is the same loss from per-sample cross-entropy,
  for callers that compute that class-sharded and reduce in the global view.
  """

  name: str
  options: dict[str, Any]

  def reduce(self, ce: Array) -> Array:
    return _CRITERIA[self.name](ce, **self.options)

  def __call__(self, logits: Array, labels: Array, *, axis_name=None,
               num_classes: int | None = None) -> Array:
    return self.reduce(criteria.per_sample_cross_entropy(
        logits, labels, axis_name=axis_name, num_classes=num_classes))


def get_criterion(name: str, **options) -> Criterion:
  """The criterion called ``name`` ('softmax', 'focal' or 'ohem')."""
  if name not in _CRITERIA:
    raise ValueError(f'unknown criterion {name!r}; choose one of '
                     f'{criterion_names()}')
  if name == 'softmax' and options:
    raise ValueError(
        f'criterion softmax takes no options, got {sorted(options)}')
  return Criterion(name, _options('criterion', name, _CRITERIA[name], options))
