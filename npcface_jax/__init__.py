"""NPCFace loss and face-recognition trainer in JAX.

The loss core is public API for use from any JAX code:

    from npcface_jax import npcface_logits, softmax_cross_entropy
    loss = softmax_cross_entropy(npcface_logits(cos, labels), labels)

These names are imported on first use (PEP 562), so that importing a
submodule that needs no JAX (``npcface_jax.faces.images``,
``npcface_jax.evaluation.bin_format``, as data_prep and its worker
processes do) does not import JAX.

The top level holds this API and the commands (``python -m npcface_jax.X``
for X in main, evaluate, verify, embed, identify, export, report, sweep);
the libraries live in folders named for their role (docs/architecture.md).
The module paths of release 0.1.0 (``npcface_jax.heads``,
``npcface_jax.chunked_loss``, ...) still import, as the same modules, with
a DeprecationWarning naming the new path, until the next release (MOVED).
"""

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

__version__ = '0.1.0'

_EXPORTS = {
    'loss.heads': (
        'NPCFACE_PRESETS', 'adacos_init_state', 'adacos_logits',
        'adam_init_margins', 'adam_project_margins', 'adam_softmax_logits',
        'arcface_logits', 'arcnegface_logits', 'cosface_logits',
        'curricularface_init_state', 'curricularface_logits',
        'mv_am_softmax_logits', 'mv_arc_softmax_logits', 'npcface_logits',
        'softmax_logits', 'sphereface_init_state', 'sphereface_logits',
        'adaface_init_state', 'adaface_logits', 'magface_logits',
        'elasticface_logits', 'sphereface2_logits', 'uniface_logits',
        'Given', 'Head', 'HeadOutput', 'HEADS'),
    'loss.criteria': ('focal_loss', 'ohem_loss', 'per_sample_cross_entropy',
                      'one_vs_all_and_top1', 'softmax_cross_entropy'),
    'loss.registry': ('get_criterion', 'get_head'),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items()
              for name in names}
__all__ = sorted(_MODULE_OF)

# Where each module of the flat layout (releases up to 0.1.0) lives now.
MOVED = {
    'xla_flags': 'common.xla_flags', 'run_log': 'common.run_log',
    'textfile': 'common.textfile', 'jsonfile': 'common.jsonfile',
    'checkpoint': 'common.checkpoint', 'class_shards': 'loss.class_shards',
    'heads': 'loss.heads', 'losses': 'loss.criteria',
    'chunked_loss': 'loss.chunked', 'registry': 'loss.registry',
    'classifier': 'loss.classifier', 'alignment': 'faces.alignment',
    'images': 'faces.images', 'detection': 'faces.detection',
    'input_pipeline': 'data.input_pipeline', 'synthetic': 'data.synthetic',
    'protocols': 'evaluation.protocols', 'roc_plot': 'evaluation.roc_plot',
    'verification_bin': 'evaluation.bin_format', 'ijb': 'evaluation.ijb',
    'identification': 'evaluation.ranking',
    'embedding': 'evaluation.embedding_step', 'run_dir': 'serving.run_dir',
    'inference': 'serving.trained_run', 'serving': 'serving.export_formats',
    'onnx_graph': 'serving.onnx_graph', 'model_card': 'serving.model_card',
    'config_checks': 'training.config_checks',
    'training_data': 'training.data_source', 'factories': 'training.setup',
    'train_step': 'training.train_step', 'train': 'training.loop',
    'finetune': 'training.finetune', 'analysis': 'training.hard_samples',
    'verification': 'training.periodic_eval',
    'comparison': 'study.comparison', 'figures': 'study.figures',
}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """``import npcface_jax.heads`` (the flat layout) gives the module at its
  new path, the same object, with a DeprecationWarning naming that path.
  ``npcface_jax.serving`` is a folder now, so it is not aliased."""

  def find_spec(self, fullname, path=None, target=None):
    old = fullname.rpartition('.')[2]
    if (fullname.rpartition('.')[0] != __name__ or old not in MOVED
        or old == 'serving'):
      return None
    return importlib.machinery.ModuleSpec(fullname, self)

  def create_module(self, spec):
    new = f'{__name__}.{MOVED[spec.name.rpartition(".")[2]]}'
    warnings.warn(f'{spec.name} moved to {new}; import it from there (the '
                  'old path goes in the next release)', DeprecationWarning,
                  stacklevel=3)
    return importlib.import_module(new)

  def exec_module(self, module):
    """Already executed at its new path."""


sys.meta_path.append(_OldPaths())


def __getattr__(name: str):
  """An exported name, or a module of the flat layout (deprecated), imported
  now and kept."""
  if name in MOVED and name != 'serving':
    return importlib.import_module(f'{__name__}.{name}')
  if name not in _MODULE_OF:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  module = importlib.import_module(f'{__name__}.{_MODULE_OF[name]}')
  value = globals()[name] = getattr(module, name)
  return value


def __dir__() -> list[str]:
  return sorted({*globals(), *__all__})
