"""Checks of a training config before anything compiles.

Every impossible value is reported at once, each naming its field and what
would fix it, so a typo costs seconds rather than a compile or a failed
first step on a cluster.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from npcface_jax import models
from npcface_jax.faces import images
from npcface_jax.loss import heads, registry

_DTYPES = ('float32', 'bfloat16')


class ConfigError(ValueError):
  """A config that cannot run; the message lists every problem."""


def head_options(config) -> dict[str, Any]:
  """The selected head's options as a plain dict for registry.get_head.
  Beside NPCFace's ``preset`` (configs/default.py), its fields left None
  are dropped, so that the preset gives them."""
  if config.head not in config.head_options:
    return {}
  options = dict(config.head_options[config.head])
  if config.head == 'npcface' and 'preset' in options:
    options = {k: v for k, v in options.items() if v is not None}
  return options


def criterion_options(config) -> dict[str, Any]:
  return dict(config.criterion_options[config.criterion]) if (
      config.criterion in config.criterion_options) else {}


def check(config, *, num_devices: int, process_count: int = 1) -> None:
  """Raises ConfigError listing every problem of ``config``."""
  problems = _Problems(config)
  _check_data_and_model(config, problems)
  _check_loss(config, problems)
  _check_layout(config, problems, num_devices, process_count)
  _check_optimizer(config, problems)
  _check_logging(config, problems)
  _check_finetune(config, problems)
  if config.dataset == 'synthetic':
    _check_synthetic(config, problems)
  if problems:
    raise ConfigError('the config cannot run:\n  ' + '\n  '.join(problems))


class _Problems(list):
  """The problems found so far, as messages."""

  def __init__(self, config):
    super().__init__()
    self.config = config

  def need(self, ok: bool, field: str, message: str) -> None:
    """Records ``message`` about ``config.<field>`` unless ``ok``."""
    if not ok:
      self.append(f'config.{field} = {_get(self.config, field)!r}: {message}')


def _check_data_and_model(config, problems: _Problems) -> None:
  need = problems.need
  need(bool(config.dataset), 'dataset',
       "set it to a `python -m data_prep train` output directory, or "
       "'synthetic' for synthetic identities")
  if config.dataset and config.dataset != 'synthetic':
    need(os.path.isdir(config.dataset), 'dataset',
         'no such directory (run `python -m data_prep train` first)')
  need(config.num_classes == -1 or config.num_classes > 0, 'num_classes',
       "use -1 (the dataset's count) or a positive number")
  need(config.model in models.names(), 'model',
       f'choose one of {models.names()}')
  need(config.dtype in _DTYPES, 'dtype', f'choose one of {list(_DTYPES)}')
  need(config.embedding_dim > 0, 'embedding_dim', 'must be positive')
  try:
    images.input_contract(config)
  except ValueError as e:
    problems.append(str(e))
  strict = _get(config, 'strict_records')  # None: a config from before it
  need(strict is None or isinstance(strict, bool), 'strict_records',
       'must be True (a damaged record stops the run) or False (it is '
       'skipped, named and counted)')


def _check_loss(config, problems: _Problems) -> None:
  """The head, the criterion and the classifier's chunking and sampling."""
  need = problems.need
  need(config.head in registry.head_names(), 'head',
       f'choose one of {registry.head_names()}')
  if config.head in registry.head_names():
    _check_head(config, problems)
  need(config.criterion in registry.criterion_names(), 'criterion',
       f'choose one of {registry.criterion_names()}')
  if config.criterion in registry.criterion_names():
    try:
      registry.get_criterion(config.criterion, **criterion_options(config))
    except ValueError as e:
      problems.append(f'config.criterion_options.{config.criterion}: {e}')
  opts = criterion_options(config)
  if 'keep_fraction' in opts:
    need(0 < opts['keep_fraction'] <= 1,
         f'criterion_options.{config.criterion}.keep_fraction',
         'must be in (0, 1]')
  if 'gamma' in opts:
    need(opts['gamma'] >= 0, f'criterion_options.{config.criterion}.gamma',
         'must be >= 0')
  need(config.chunk_size >= -1, 'chunk_size',
       'use -1 (chunked where the head can), 0 (full logits) or a block size')
  need(0 < config.sample_rate <= 1, 'sample_rate',
       'must be in (0, 1] (1: every class, Partial FC off)')


def _check_layout(config, problems: _Problems, num_devices: int,
                  process_count: int) -> None:
  """The model axis and the batches over the devices and processes."""
  need = problems.need
  mp = config.model_parallel
  need(mp >= 1 and num_devices % mp == 0, 'model_parallel',
       f'must divide the {num_devices} devices')
  need(config.batch_size > 0 and config.batch_size % num_devices == 0
       and config.batch_size % process_count == 0, 'batch_size',
       f'must be a positive multiple of the {num_devices} devices '
       f'(and of the {process_count} processes)')
  need(config.eval_batch_size > 0 and
       config.eval_batch_size % num_devices == 0, 'eval_batch_size',
       f'must be a positive multiple of the {num_devices} devices')


def _check_optimizer(config, problems: _Problems) -> None:
  """The schedule, the optimizer and what to do with a non-finite step."""
  need = problems.need
  need(config.num_train_steps > 0 or config.num_epochs > 0, 'num_epochs',
       'must be positive (or set num_train_steps)')
  need(config.learning_rate > 0, 'learning_rate', 'must be positive')
  bounds = list(config.lr_boundaries)
  need(all(b > 0 for b in bounds) and bounds == sorted(set(bounds)),
       'lr_boundaries', 'must be positive epochs in increasing order')
  need(0 < config.lr_decay <= 1, 'lr_decay', 'must be in (0, 1]')
  need(config.warmup_epochs >= 0, 'warmup_epochs', 'must be >= 0')
  need(0 <= config.momentum < 1, 'momentum', 'must be in [0, 1)')
  need(config.weight_decay >= 0, 'weight_decay', 'must be >= 0')
  need(config.grad_clip_norm >= 0, 'grad_clip_norm',
       'use 0 (off) or a positive norm')
  need(config.nonfinite in ('stop', 'skip'), 'nonfinite',
       "must be 'stop' or 'skip'")
  need(config.get('grad_clip_scope', 'all') in ('all', 'backbone'),
       'grad_clip_scope', "must be 'all' or 'backbone'")
  need(config.get('classifier_init_std', 0.0) >= 0, 'classifier_init_std',
       'use 0 (unit-norm rows) or a positive std')
  for pattern in (config.get('frozen_params', '') or '').split(','):
    try:
      re.compile(pattern.strip())
    except re.error as e:
      need(False, 'frozen_params', f'{pattern.strip()!r} is not a regular '
           f'expression ({e})')


def _check_logging(config, problems: _Problems) -> None:
  """Logging, checkpoints and evaluation during training."""
  need = problems.need
  need(config.log_every_steps > 0, 'log_every_steps', 'must be positive')
  need(config.checkpoint_every_steps > 0, 'checkpoint_every_steps',
       'must be positive')
  need(config.keep_checkpoints >= 1, 'keep_checkpoints', 'must be >= 1')
  need(config.eval_every_steps >= 0, 'eval_every_steps',
       'use 0 (only at the end) or a positive interval')
  need(config.analysis_every_steps >= -1, 'analysis_every_steps',
       'use -1 (once an epoch), 0 (off) or a positive interval')
  need(0.0 <= config.analysis_margin < math.pi, 'analysis_margin',
       'an angle in radians in [0, pi): 0 counts top-1 errors, the '
       "paper's 0.4 its hard samples")
  for path in verification_targets(config):
    need(os.path.isfile(path), 'verification_targets',
         f'{path!r} is not a file (insightface .bin verification sets)')


def _check_synthetic(config, problems: _Problems) -> None:
  need, syn = problems.need, config.synthetic
  need(syn.num_classes > 1, 'synthetic.num_classes', 'must be at least 2')
  need(syn.image_size > 0, 'synthetic.image_size', 'must be positive')
  need(syn.epoch_examples >= config.batch_size, 'synthetic.epoch_examples',
       f'must be at least the batch ({config.batch_size})')
  if syn.heldout_identities:
    need(syn.heldout_identities >= 2 and syn.heldout_samples >= 2,
         'synthetic.heldout_identities',
         'needs at least 2 identities of at least 2 samples '
         '(synthetic.heldout_samples) to make pairs')
    need(syn.heldout_pairs >= 20, 'synthetic.heldout_pairs',
         'must be at least 20 for 10-fold verification')


def _check_finetune(config, problems: _Problems) -> None:
  """init_from's form (its run is read only when a run starts fresh, so
  that a resumed run does not need it) and the frozen steps."""
  spec = _get(config, 'init_from')
  if not isinstance(spec, str):
    problems.need(False, 'init_from',
                  "must be a string: '' (off), 'WORKDIR' or 'WORKDIR:STEP'")
  elif spec:
    try:
      init_from_parts(spec)
    except ValueError as e:
      problems.need(False, 'init_from', str(e))
  steps = _get(config, 'freeze_backbone_steps')
  problems.need(
      isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0,
      'freeze_backbone_steps', 'must be a whole number of steps >= 0 (0: off)')


def init_from_parts(spec: str) -> tuple[str, int | None]:
  """(workdir, step) of config.init_from 'WORKDIR' or 'WORKDIR:STEP' (step
  None: the newest); ValueError naming the fix. A last colon followed by no
  '/' starts the STEP, so 'gs://bucket/run' is a workdir."""
  workdir, colon, step = spec.rpartition(':')
  if not colon or '/' in step or '\\' in step:
    workdir, step = spec, None
  elif not (step.isascii() and step.isdigit()):
    raise ValueError(f"STEP {step!r} is not a step number: use 'WORKDIR' "
                     "(its newest checkpoint) or 'WORKDIR:STEP', e.g. "
                     "'/runs/casia:64000'")
  if not workdir.strip():
    raise ValueError("no WORKDIR: use 'WORKDIR' or 'WORKDIR:STEP', the "
                     '--workdir of the run to start from')
  return workdir, None if step is None else int(step)


def check_num_classes(config, dataset_classes: int) -> None:
  """The config's class count (if given) must be the dataset's."""
  if config.num_classes not in (-1, dataset_classes):
    raise ConfigError(
        f'config.num_classes = {config.num_classes} but the dataset '
        f'{config.dataset!r} has {dataset_classes} classes (data_prep '
        'metadata): use -1 to take the dataset\'s count')


def verification_targets(config) -> list[str]:
  return [p.strip() for p in str(config.verification_targets).split(',')
          if p.strip()]


def _check_head(config, problems):
  options = head_options(config)
  if config.head == 'npcface' and 'preset' in options and (
      options['preset'] not in heads.NPCFACE_PRESETS):
    problems.append(f'config.head_options.npcface.preset = '
                    f'{options["preset"]!r}: choose one of '
                    f'{sorted(heads.NPCFACE_PRESETS)}')
    return
  try:
    head = registry.get_head(config.head, **options)
  except ValueError as e:
    problems.append(f'config.head_options.{config.head}: {e}')
    return
  field = f'head_options.{config.head}'
  if 'scale' in head.options and not head.options['scale'] > 0:
    problems.append(f'config.{field}.scale = {head.options["scale"]!r}: '
                    'must be positive')
  for name in ('margin', 'm0', 'm1', 'alpha'):
    if name in head.options and head.options[name] < 0:
      problems.append(f'config.{field}.{name} = {head.options[name]!r}: '
                      'must be >= 0')
  if 't' in head.options and head.options['t'] < 1:
    problems.append(f'config.{field}.t = {head.options["t"]!r}: must be >= 1 '
                    '(it scales hard negatives up)')
  if config.chunk_size > 0 and not head.has_parts:
    problems.append(f'config.chunk_size = {config.chunk_size}: head '
                    f'{config.head!r} has no chunked form; use 0 (the full '
                    'logits) or -1 (chunked wherever the head can be)')
  if head.one_vs_all is not None and config.criterion == 'focal':
    problems.append(f'config.criterion = \'focal\': head {config.head!r} is '
                    'its own one-vs-all criterion, whose loss is no '
                    '-log p_y for focal to weight; use \'softmax\' (its '
                    'mean) or \'ohem\' (its hardest samples)')
  if head.one_vs_all is not None and criterion_options(config).get(
      'min_prob', 0.0) > 0:
    problems.append(f'config.criterion_options.softmax.min_prob: head '
                    f'{config.head!r} is its own one-vs-all criterion, '
                    'whose loss is no -log p_y to clamp; use 0')


DEFAULT_CHUNK = 4096  # classes per block where config.chunk_size is -1


def chunk_size(config, head) -> int | None:
  """The chunked loss's block for this config and head (None: the full
  logits): config.chunk_size, or DEFAULT_CHUNK where it is -1 and the head
  has a chunked form."""
  if config.chunk_size == -1:
    return DEFAULT_CHUNK if head.has_parts else None
  return config.chunk_size or None


def _get(config, field: str):
  value = config
  for part in field.split('.'):
    try:
      value = value[part]
    except (KeyError, TypeError):
      return None
  return value
