"""NPCFace loss and face-recognition trainer in JAX.

The loss core is public API for use from any JAX code:

    from npcface_jax import npcface_logits, softmax_cross_entropy
    loss = softmax_cross_entropy(npcface_logits(cos, labels), labels)

These names are imported on first use (PEP 562), so that importing a
submodule that needs no JAX (``npcface_jax.images``, ``.verification_bin``,
as data_prep and its worker processes do) does not import JAX.
"""

import importlib

__version__ = '0.1.0'

_EXPORTS = {
    'heads': (
        'NPCFACE_PRESETS', 'adacos_init_state', 'adacos_logits',
        'adam_init_margins', 'adam_project_margins', 'adam_softmax_logits',
        'arcface_logits', 'arcnegface_logits', 'cosface_logits',
        'curricularface_init_state', 'curricularface_logits',
        'mv_am_softmax_logits', 'mv_arc_softmax_logits', 'npcface_logits',
        'softmax_logits', 'sphereface_init_state', 'sphereface_logits'),
    'losses': ('focal_loss', 'ohem_loss', 'per_sample_cross_entropy',
               'softmax_cross_entropy'),
    'registry': ('HeadOutput', 'get_criterion', 'get_head'),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items()
              for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
  """An exported name, or one of the submodules that hold them, imported
  now and kept."""
  if name in _EXPORTS:
    return importlib.import_module(f'{__name__}.{name}')
  if name not in _MODULE_OF:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  module = importlib.import_module(f'{__name__}.{_MODULE_OF[name]}')
  value = globals()[name] = getattr(module, name)
  return value


def __dir__() -> list[str]:
  return sorted({*globals(), *__all__})
