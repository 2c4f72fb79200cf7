"""Heads and criteria by name, for configs and the trainer.

A config says ``head='npcface'`` (with ``head_options`` such as
``{'preset': 'facex_zoo'}`` or single fields) and ``criterion='focal'``;
``get_head`` and ``get_criterion`` check the names and options up front, so a
typo fails before anything compiles:

    head = get_head('curricularface', margin=0.5)
    state = head.init_state(num_classes)              # {} when stateless
    params = head.init_params(key, num_classes)       # {} unless AdaM-softmax
    out = head(cos, labels, state, params)            # HeadOutput
    loss = get_criterion('softmax')(out.logits, labels) + out.aux_loss

A head is one object (heads.py: the protocol, every head, and ``HEADS``,
the plain mapping of names to them); what a trainer needs to treat every
head alike is on it (``project``, ``per_class_params``, ``diagnostics``,
``parts``, ``needs``, ...).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax

from npcface_jax.loss import criteria, heads
# Where these were before heads became one object each (release 0.1.0).
from npcface_jax.loss.heads import Head, HeadOutput  # noqa: F401

Array = jax.Array


# Each criterion is a reduction of the per-sample cross-entropy.
_CRITERIA: dict[str, Callable[..., Array]] = {
    'softmax': criteria.softmax_reduce,
    'focal': criteria.focal_reduce,
    'ohem': criteria.ohem_reduce,
}


def head_names() -> list[str]:
  return sorted(heads.HEADS)


def criterion_names() -> list[str]:
  return sorted(_CRITERIA)


def _options(kind: str, name: str, fn, options: dict[str, Any]):
  """The options checked against fn's keywords, with its defaults filled in."""
  params = {p.name: p for p in inspect.signature(fn).parameters.values()
            if p.name != 'ce'}
  unknown = sorted(set(options) - set(params))
  if unknown:
    raise ValueError(f'{kind} {name!r} has no option(s) {unknown}; '
                     f'its options are {sorted(params)}')
  defaults = {k: p.default for k, p in params.items()
              if p.default is not inspect.Parameter.empty}
  return {**defaults, **options}


def get_head(name: str, **options) -> heads.Head:
  """The head called ``name`` bound to its options (the head's fields, its
  paper's defaults for the rest); NPCFace also takes ``preset=``
  (NPCFACE_PRESETS). ValueError naming an unknown head or option."""
  if name not in heads.HEADS:
    raise ValueError(f'unknown head {name!r}; choose one of {head_names()}')
  return heads.HEADS[name].create(**options)


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
  return Criterion(name, _options('criterion', name, _CRITERIA[name], options))
