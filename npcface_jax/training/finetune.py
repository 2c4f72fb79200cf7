"""Fine-tuning from another run (config.init_from): a fresh run takes its
backbone, parameters and BatchNorm statistics, from that run's checkpoint,
and starts its new classifier (any class count) at the class means of its
own training data's embeddings, so that the first steps train from rows
that already point at the classes instead of random ones. The head's own
parameters and state and the optimizer state start fresh. Freezing the
backbone for the first steps (config.freeze_backbone_steps) is the step's
(train_step.py).

The source run is checked (its directory, run.json, the backbone it
trained, the checkpoint's step) before any array is read or anything
computed, and its arrays' shapes again as they are restored.
"""

from __future__ import annotations

import json
import logging
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from npcface_jax.common.arrays import l2_normalize
from npcface_jax.common import checkpoint
from npcface_jax.faces import images
from npcface_jax.serving import run_dir
from npcface_jax.training import config_checks, setup

Array = jax.Array


class Source(NamedTuple):
  """The run a fine-tuning starts from."""
  workdir: str
  step: int  # its checkpoint's (the newest when init_from names none)


def _error(spec: str, message: str) -> config_checks.ConfigError:
  return config_checks.ConfigError(f'config.init_from = {spec!r}: {message}')


def check_source(config, image_size: int) -> Source:
  """config.init_from's run, checked against this run's backbone and
  ``image_size``; ConfigError naming the fault and the fix. Reads only
  run.json and the checkpoint directory's listing."""
  spec = config.init_from
  try:
    workdir, step = config_checks.init_from_parts(spec)
  except ValueError as e:
    raise _error(spec, str(e)) from None
  if not os.path.isdir(workdir):
    raise _error(spec, f'{workdir} is not a directory: name the --workdir '
                 'of the trained run to start from')
  try:
    source, source_size = run_dir.load_run(workdir)
  except (OSError, ValueError) as e:
    raise _error(spec, f'{e} (init_from names such a workdir)') from None
  _check_same_backbone(spec, config, image_size, source, source_size)
  return Source(workdir, _checkpoint_step(spec, workdir, step))


def _backbone_options(options) -> dict:
  """model_options as JSON keeps them (tuples as lists), less ``impl``,
  which picks a formulation, not the parameters."""
  plain = options.to_dict() if hasattr(options, 'to_dict') else dict(
      options or {})
  plain = json.loads(json.dumps(plain, default=str))
  plain.pop('impl', None)
  return plain


def _check_same_backbone(spec, config, image_size, source, source_size):
  """The source's backbone must be this run's: model, its options, the
  embedding's size, the input contract and the image side."""
  model, dim = source.get('model'), source.get('embedding_dim')
  theirs_in = images.input_contract(source)
  pairs = [
      ('config.input', theirs_in, images.input_contract(config),
       ' '.join(f'--config.input.{k}={v}'
                for k, v in theirs_in._asdict().items())),
      ('config.model', model, config.model, f'config.model={model!r}'),
      ('config.model_options', _backbone_options(source.get('model_options')),
       _backbone_options(config.model_options),
       'config.model_options as that run had them'),
      ('config.embedding_dim', dim, config.embedding_dim,
       f'config.embedding_dim={dim}'),
      ('the image size', source_size, image_size,
       f'data prepared at {source_size}x{source_size} (data_prep train '
       f'--image-size={source_size}; synthetic: config.synthetic.image_size)'),
  ]
  wrong = [f'{name} is {theirs!r} there but {ours!r} here (use {fix})'
           for name, theirs, ours, fix in pairs if theirs != ours]
  if wrong:
    raise _error(spec, 'that run trained a different backbone: '
                 + '; '.join(wrong) + ', or start without init_from')


def _checkpoint_step(spec: str, workdir: str, step: int | None) -> int:
  """The source checkpoint's step: ``step``, or the newest."""
  directory = os.path.join(workdir, 'checkpoints')
  steps = []
  if os.path.isdir(directory):
    listing = checkpoint.Checkpointer(directory, keep=1, every_steps=1,
                                      asynchronous=False, read_only=True)
    try:
      steps = sorted(listing.all_steps())
    finally:
      listing.close()
  if not steps:
    raise _error(spec, f'no checkpoint in {directory}: train that run until '
                 'it writes one (config.checkpoint_every_steps), or name '
                 'another workdir')
  if step is None:
    return steps[-1]
  if step not in steps:
    raise _error(spec, f'no checkpoint of step {step} in {directory}; it has '
                 f'steps {steps}: use one of them, or WORKDIR alone for the '
                 'newest')
  return step


def _shapes(tree) -> dict[str, tuple]:
  return {jax.tree_util.keystr(path, simple=True, separator='/'):
          tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def restore_backbone(source: Source, target: setup.TrainState) -> dict:
  """{'params', 'batch_stats'} of the source's checkpoint, exactly as saved,
  laid out as ``target`` (an abstract_state) lays out the backbone."""
  want = {'params': target.params['backbone'],
          'batch_stats': target.batch_stats}
  mesh = target.params['classifier'].sharding.mesh
  variables, _ = run_dir.restore_variables(source.workdir, mesh, source.step)
  theirs, ours = _shapes(variables), _shapes(want)
  if theirs != ours:
    differ = sorted(k for k in set(theirs) | set(ours)
                    if theirs.get(k) != ours.get(k))
    raise config_checks.ConfigError(
        f'config.init_from: the checkpoint of step {source.step} in '
        f'{source.workdir} holds another backbone than this run builds '
        f'(arrays {differ[:5]} differ): set config.model and its options '
        'as that run had them')
  return jax.device_put(variables, jax.tree.map(lambda t: t.sharding, want))


def _accumulator(task: setup.Task, rows_sharding):
  """The jitted ``add(sums, counts, variables, batch)``: the batch's
  L2-normalised embeddings (inference mode) summed by label into the
  (rows, D) sums, and counted, laid out as the classifier's rows."""
  rows = task.padded_classes
  all_devices = NamedSharding(task.mesh, P(('data', 'model')))

  def add(sums, counts, variables, batch):
    images = lax.with_sharding_constraint(batch['image'], all_devices)
    labels = lax.with_sharding_constraint(batch['label'], all_devices)
    labels = labels.astype(jnp.int32)
    e = task.model.apply(variables, images, train=False)
    e = l2_normalize(e.astype(jnp.float32))
    sums = sums + jax.ops.segment_sum(e, labels, num_segments=rows)
    counts = counts + jax.ops.segment_sum(jnp.ones_like(labels), labels,
                                          num_segments=rows)
    return sums, counts

  return jax.jit(add, donate_argnums=(0, 1),
                 out_shardings=(rows_sharding, rows_sharding))


def class_sums(task: setup.Task, variables: dict, batches, steps: int,
               rows_sharding) -> tuple[Array, Array]:
  """(sums (rows, D), counts (rows,)): the normalised embeddings of the
  next ``steps`` global batches of the stream ``batches``, summed by label
  on the device; padding rows stay zero."""
  add = _accumulator(task, rows_sharding)
  rows, d = task.padded_classes, task.embedding_dim
  sums = jax.device_put(jnp.zeros((rows, d), jnp.float32), rows_sharding)
  counts = jax.device_put(jnp.zeros((rows,), jnp.int32), rows_sharding)
  for _ in range(steps):
    sums, counts = add(sums, counts, variables, next(batches))
  return sums, counts


def class_mean_rows(sums: Array, counts: Array, random_rows: Array) -> Array:
  """Each shown class's mean embedding, L2-normalised; a class no batch
  showed (and a padding row, zero) keeps its row of ``random_rows``."""
  return jnp.where(counts[:, None] > 0, l2_normalize(sums),
                   random_rows)


def init_state(task: setup.Task, data, config,
               target: setup.TrainState | None = None) -> setup.TrainState:
  """A fresh state whose backbone is config.init_from's and whose
  classifier rows are the class means of one epoch of ``data``'s stream
  (data.open(None), steps_per_epoch batches, its random flips included)
  embedded by that backbone in inference mode (``target``: the task's
  abstract_state, when the caller has it)."""
  source = check_source(config, data.image_size)
  if target is None:
    target = setup.abstract_state(task)
  variables = restore_backbone(source, target)
  fresh = setup.init_state(task, target)
  w_sharding = target.params['classifier'].sharding
  sums, counts = class_sums(task, variables, data.open(None),
                            data.steps_per_epoch, w_sharding)
  w = jax.jit(class_mean_rows, out_shardings=w_sharding)(
      sums, counts, fresh.params['classifier'])
  # Replicated scalars: every process can read them.
  seen, images = (int(n) for n in jax.jit(
      lambda c: (jnp.sum(c > 0), jnp.sum(c)),
      out_shardings=NamedSharding(task.mesh, P()))(counts))
  logging.info(
      'fine-tuning: backbone (parameters, BatchNorm statistics) from %s, '
      'step %d; classifier rows = class means of %d images of one epoch: '
      '%d of %d classes, %d unseen keep random rows', source.workdir,
      source.step, images, seen, task.num_classes, task.num_classes - seen)
  params = {**fresh.params, 'backbone': variables['params'], 'classifier': w}
  return fresh.replace(params=params, batch_stats=variables['batch_stats'])
