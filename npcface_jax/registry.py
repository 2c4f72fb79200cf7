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
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from npcface_jax import heads, losses

Array = jax.Array


class HeadOutput(NamedTuple):
  logits: Array
  state: dict[str, Array]  # the head's new state ({} for stateless heads)
  aux_loss: Array  # added to the criterion (AdaM-softmax's regulariser), else 0
  metrics: dict[str, Array]  # per-sample diagnostics (NPCFace), else {}


_NO_STATE = lambda num_classes: {}  # noqa: E731
_NO_PARAMS = lambda key, num_classes: {}  # noqa: E731


@dataclasses.dataclass(frozen=True)
class _Entry:
  fn: Callable[..., Any]
  # What the fn takes after labels and returns: 'plain' (logits), 'state'
  # (state -> logits, state), 'params' (margins -> logits, regulariser) or
  # 'diagnostics' (logits and per-sample diagnostics).
  kind: str
  init_state: Callable[[int], dict] = _NO_STATE
  init_params: Callable[[Array, int], dict] = _NO_PARAMS


_HEADS: dict[str, _Entry] = {
    'softmax': _Entry(heads.softmax_logits, 'plain'),
    'sphereface': _Entry(heads.sphereface_logits, 'state',
                         lambda n: heads.sphereface_init_state()),
    'cosface': _Entry(heads.cosface_logits, 'plain'),
    'am_softmax': _Entry(heads.cosface_logits, 'plain'),
    'arcface': _Entry(heads.arcface_logits, 'plain'),
    'adacos': _Entry(heads.adacos_logits, 'state', heads.adacos_init_state),
    'adam_softmax': _Entry(
        heads.adam_softmax_logits, 'params',
        init_params=lambda key, n: {'margins': heads.adam_init_margins(key, n)}),
    'mv_am_softmax': _Entry(heads.mv_am_softmax_logits, 'plain'),
    'mv_arc_softmax': _Entry(heads.mv_arc_softmax_logits, 'plain'),
    'arcnegface': _Entry(heads.arcnegface_logits, 'plain'),
    'curricularface': _Entry(heads.curricularface_logits, 'state',
                             lambda n: heads.curricularface_init_state()),
    'npcface': _Entry(heads.npcface_logits, 'diagnostics'),
}

# Each criterion is a reduction of the per-sample cross-entropy.
_CRITERIA: dict[str, Callable[..., Array]] = {
    'softmax': lambda ce: jnp.mean(ce),
    'focal': losses.focal_reduce,
    'ohem': losses.ohem_reduce,
}

# Arguments the registry passes itself; not options a config may set.
_RESERVED = {'cos', 'ce', 'labels', 'state', 'margins', 'axis_name',
             'num_classes', 'return_diagnostics'}


def head_names() -> list[str]:
  return sorted(_HEADS)


def criterion_names() -> list[str]:
  return sorted(_CRITERIA)


def _check_options(kind: str, name: str, fn, options: dict[str, Any]):
  allowed = sorted(p for p in inspect.signature(fn).parameters
                   if p not in _RESERVED)
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f'{kind} {name!r} has no option(s) {unknown}; '
                     f'its options are {allowed}')


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
  """The head called ``name``; NPCFace also takes ``preset=`` (NPCFACE_PRESETS)."""
  if name not in _HEADS:
    raise ValueError(f'unknown head {name!r}; choose one of {head_names()}')
  options = dict(options)
  if name == 'npcface' and 'preset' in options:
    preset = options.pop('preset')
    if preset not in heads.NPCFACE_PRESETS:
      raise ValueError(f'unknown NPCFace preset {preset!r}; choose one of '
                       f'{sorted(heads.NPCFACE_PRESETS)}')
    options = {**heads.NPCFACE_PRESETS[preset], **options}
  _check_options('head', name, _HEADS[name].fn, options)
  return Head(name, options, _HEADS[name])


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
    return self.reduce(losses.per_sample_cross_entropy(
        logits, labels, axis_name=axis_name, num_classes=num_classes))


def get_criterion(name: str, **options) -> Criterion:
  """The criterion called ``name`` ('softmax', 'focal' or 'ohem')."""
  if name not in _CRITERIA:
    raise ValueError(f'unknown criterion {name!r}; choose one of '
                     f'{criterion_names()}')
  if name != 'softmax':
    _check_options('criterion', name, _CRITERIA[name], options)
  elif options:
    raise ValueError(f'criterion softmax takes no options, got {sorted(options)}')
  return Criterion(name, options)
