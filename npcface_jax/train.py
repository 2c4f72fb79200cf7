"""Training: the train state, the jitted train step, and the loop that joins
them to the input pipeline, checkpoints, metrics and verification.

Layout over a mesh ('data', 'model') (DESIGN.md s. 5): the backbone runs
data parallel over every device (each holds B / devices images); the
classifier W (C, D) is replicated when the 'model' axis has size 1, else its
rows are split over 'model' and the loss runs class-sharded
(classifier.sharded_classifier_loss) on the embeddings of each 'data' row,
as Partial FC does; with ``sample_rate`` < 1 each shard also scores only
the batch's targets and a random share of its other classes (Partial FC's
sampling, classifier.py). Everything else is replicated. The step is one
jit with explicit shardings and the state donated; gradients are taken in
the global view, so their scale is right whatever the layout.

This module needs neither TensorFlow nor clu to build and run a step (a GPU
machine fed synthetic batches has neither); the loop imports them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from npcface_jax import (checkpoint, classifier, config_checks, evaluate,
                         heads, input_pipeline, models, registry)

Array = jax.Array
_STEP_RNG, _INIT_RNG, _SAMPLE_RNG = 1, 2, 3


class TrainState(flax.struct.PyTreeNode):
  step: Array
  params: Any  # {'backbone': ..., 'classifier': W (C_padded, D), 'head': ...}
  batch_stats: Any
  opt_state: Any
  head_state: Any  # AdaCos's scale, CurricularFace's t, SphereFace's step


@dataclasses.dataclass(frozen=True)
class Task:
  """What the state and the step are built from, besides arrays."""
  model: Any  # flax module
  head: registry.Head
  criterion: registry.Criterion
  tx: optax.GradientTransformation
  schedule: Callable[[Array], Array]
  mesh: Mesh
  num_classes: int
  image_size: int
  embedding_dim: int
  chunk_size: int | None
  seed: int
  num_sample: int | None = None  # Partial FC: rows each shard scores

  @property
  def padded_classes(self) -> int:
    return classifier.padded_num_classes(self.num_classes,
                                         self.mesh.shape['model'])


# --- Building blocks (pure) --------------------------------------------------

def make_mesh(model_parallel: int = 1, devices=None) -> Mesh:
  """The ('data', 'model') mesh over all devices (of all processes)."""
  n = len(devices) if devices is not None else jax.device_count()
  if model_parallel < 1 or n % model_parallel:
    raise ValueError(f'model_parallel {model_parallel} does not divide the '
                     f'{n} devices')
  return jax.make_mesh((n // model_parallel, model_parallel),
                       ('data', 'model'), axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def learning_rate_schedule(config, steps_per_epoch: int):
  """lr divided at each boundary epoch (times lr_decay), after an optional
  linear warm-up, as a function of the step."""
  boundaries = {max(1, round(b * steps_per_epoch)): config.lr_decay
                for b in config.lr_boundaries}
  base = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
  warmup = round(config.warmup_epochs * steps_per_epoch)

  def schedule(step):
    lr = base(step)
    if warmup:
      lr = lr * jnp.minimum(1.0, (step + 1) / warmup)
    return lr

  return schedule


def create_optimizer(config, steps_per_epoch: int):
  """SGD with momentum and weight decay on every parameter, as the paper's
  PyTorch recipe (decay added to the gradient, after optional clipping)."""
  schedule = learning_rate_schedule(config, steps_per_epoch)
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.weight_decay > 0:
    parts.append(optax.add_decayed_weights(config.weight_decay))
  parts.append(optax.sgd(schedule, momentum=config.momentum or None))
  return optax.chain(*parts), schedule


def create_model(config, *, train_dtype: bool = True):
  dtype = jnp.bfloat16 if config.dtype == 'bfloat16' and train_dtype else None
  try:
    return models.create(config.model, embedding_dim=config.embedding_dim,
                         dtype=dtype, **dict(config.model_options))
  except TypeError as e:
    raise config_checks.ConfigError(
        f'config.model_options = {dict(config.model_options)}: {e}') from e


def _sharding_of(path, leaf, mesh):
  """Classifier rows (and AdaM's per-class margins), with their optimizer
  state, split over 'model'; everything else replicated."""
  keys = {getattr(k, 'key', None) for k in path}
  if keys & {'classifier', 'margins'} and getattr(leaf, 'ndim', 0) >= 1:
    return NamedSharding(mesh, P('model'))
  return NamedSharding(mesh, P())


def state_shardings(task: Task, abstract_state: TrainState):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: _sharding_of(p, x, task.mesh), abstract_state)


def _init_state(task: Task, key: Array) -> TrainState:
  k_model, k_cls, k_head = jax.random.split(key, 3)
  images = jnp.zeros((1, task.image_size, task.image_size, 3), jnp.float32)
  variables = task.model.init(k_model, images, train=False)
  rows, c = task.padded_classes, task.num_classes
  # Unit-norm random class centres (FaceX-Zoo's renorm init), then zero
  # padding rows, which the heads mask out and which stay zero.
  w = jax.random.normal(k_cls, (c, task.embedding_dim), jnp.float32)
  w = classifier.l2_normalize(w)
  w = jnp.pad(w, [(0, rows - c), (0, 0)])
  head_params = jax.tree.map(
      lambda a: jnp.pad(a, [(0, rows - c)] + [(0, 0)] * (a.ndim - 1)),
      task.head.init_params(k_head, c))
  params = {'backbone': variables['params'], 'classifier': w,
            'head': head_params}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=task.tx.init(params),
                    head_state=task.head.init_state(c))


def abstract_state(task: Task) -> TrainState:
  """The state's shapes, dtypes and shardings, without computing it."""
  shapes = jax.eval_shape(functools.partial(_init_state, task),
                          jax.random.key(0))
  shardings = state_shardings(task, shapes)
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)


def init_state(task: Task) -> TrainState:
  """A fresh state from the task's seed, laid out over the mesh."""
  target = abstract_state(task)
  init = jax.jit(functools.partial(_init_state, task),
                 out_shardings=jax.tree.map(lambda s: s.sharding, target))
  return init(jax.random.fold_in(jax.random.key(task.seed), _INIT_RNG))


def _batch_axis(head: registry.Head, mesh: Mesh):
  """The mesh axis the classifier's batch is split over: 'data' when the
  classes are sharded and the head keeps no statistic of the whole batch;
  None when every shard (or the one classifier) scores the whole batch."""
  if mesh.shape['model'] == 1 or head.batch_statistics:
    return None
  return 'data'


def _classify_fn(task: Task):
  """(embeddings, W, labels, head state, head params, key) -> (ce,
  HeadOutput); the key draws Partial FC's classes."""
  if task.mesh.shape['model'] == 1:
    return lambda x, w, y, state, params, key: classifier.classifier_loss(
        x, w, y, task.head, state, params, num_classes=task.num_classes,
        chunk_size=task.chunk_size, num_sample=task.num_sample, key=key)
  return classifier.sharded_classifier_loss(
      task.mesh, task.head, task.num_classes, chunk_size=task.chunk_size,
      batch_axis=_batch_axis(task.head, task.mesh),
      num_sample=task.num_sample)


def _step_metrics(loss, ce, out, grads, lr) -> dict[str, Array]:
  m = {'loss': loss, 'cross_entropy': jnp.mean(ce),
       'accuracy': jnp.mean(out.metrics['top1'].astype(jnp.float32)),
       'grad_norm': optax.tree.norm(grads), 'learning_rate': lr}
  if 'num_hard' in out.metrics:  # NPCFace's diagnostics
    hard = out.metrics['num_hard'].astype(jnp.float32)
    m['npcface/hard_share'] = jnp.mean((hard > 0).astype(jnp.float32))
    m['npcface/hard_count'] = jnp.mean(hard)
    m['npcface/margin'] = jnp.mean(out.metrics['margin'])
  for k, v in out.state.items():  # a stateful head's scalar state
    if jnp.ndim(v) == 0:
      m[f'head/{k}'] = jnp.asarray(v, jnp.float32)
  return m


def make_train_step(task: Task, shardings: TrainState):
  """The jitted ``step(state, batch) -> (state, metrics)``, state donated."""
  classify = _classify_fn(task)
  all_devices = NamedSharding(task.mesh, P(('data', 'model')))
  base_key = jax.random.fold_in(jax.random.key(task.seed), _STEP_RNG)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(base_key, state.step)
    images = lax.with_sharding_constraint(batch['image'], all_devices)
    labels = batch['label']
    sample_key = (None if task.num_sample is None
                  else jax.random.fold_in(rng, _SAMPLE_RNG))

    def loss_fn(params):
      embeddings, mutated = task.model.apply(
          {'params': params['backbone'], 'batch_stats': state.batch_stats},
          images, train=True, mutable=['batch_stats'], rngs={'dropout': rng})
      ce, out = classify(embeddings.astype(jnp.float32), params['classifier'],
                         labels, state.head_state, params['head'],
                         sample_key)
      loss = task.criterion.reduce(ce) + out.aux_loss
      return loss, (mutated['batch_stats'], out, ce)

    (loss, (batch_stats, out, ce)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    # The optimizer's schedule runs on state.step, the batches consumed (what
    # lr_boundaries' epochs count, and the logged rate), not on optax's own
    # count, which a skipped step would leave one behind.
    updates, opt_state = task.tx.update(
        grads, _at_step(state.opt_state, state.step), state.params)
    params = optax.apply_updates(state.params, updates)
    if 'margins' in params['head']:  # AdaM-softmax keeps margins in [0, 1]
      params['head'] = {'margins': heads.adam_project_margins(
          params['head']['margins'])}
    metrics = _step_metrics(loss, ce, out, grads, task.schedule(state.step))
    new = state.replace(params=params, batch_stats=batch_stats,
                        opt_state=opt_state, head_state=out.state)
    # A NaN or infinite loss or gradient is never applied: the state stays
    # as it was but for the step (the batch is consumed, the schedule moves
    # on), so every checkpoint holds finite numbers; the loop stops or skips
    # on the 'nonfinite' flag.
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics['grad_norm'])
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics['nonfinite'] = (~finite).astype(jnp.float32)
    return new.replace(step=state.step + 1, opt_state=_at_step(
        new.opt_state, state.step + 1)), metrics

  return jax.jit(step, donate_argnums=0,
                 out_shardings=(shardings, NamedSharding(task.mesh, P())))


def _at_step(opt_state, step: Array):
  """opt_state with optax's step count(s) (the schedule's) set to ``step``,
  so that a skipped step moves the learning rate on like any other."""
  try:
    return optax.tree_utils.tree_set(opt_state, count=step)
  except KeyError:  # no count in the chain (a constant learning rate)
    return opt_state


def eval_variables(state: TrainState) -> dict:
  return {'params': state.params['backbone'], 'batch_stats': state.batch_stats}


# --- Data --------------------------------------------------------------------

class Data(NamedTuple):
  """The training data's sizes, and how to open its stream at a position."""
  num_classes: int
  image_size: int
  steps_per_epoch: int
  open: Callable[[Any], Any]  # start (a stream state() or None) -> iterator


def open_data(config, mesh: Mesh) -> Data:
  """Sizes from data_prep's metadata (or the synthetic config)."""
  image_dtype = 'bfloat16' if config.dtype == 'bfloat16' else 'float32'
  if config.dataset == 'synthetic':
    syn = config.synthetic
    config_checks.check_num_classes(config, syn.num_classes)
    stream = functools.partial(
        input_pipeline.synthetic_stream, syn.num_classes, config.batch_size,
        mesh, syn.image_size, config.seed, noise=syn.noise, dtype=image_dtype)
    return Data(syn.num_classes, syn.image_size,
                syn.epoch_examples // config.batch_size,
                lambda start: stream(start=start))
  info = input_pipeline.dataset_info(config.dataset)
  config_checks.check_num_classes(config, info.num_classes)

  def open_stream(start):
    return input_pipeline.train_stream(
        config.dataset, config.batch_size, mesh, seed=config.seed,
        start=start, flip=config.flip, dtype=image_dtype,
        shuffle_buffer=config.shuffle_buffer)

  steps = input_pipeline.steps_per_epoch(info, config.batch_size, mesh,
                                         jax.process_count())
  return Data(info.num_classes, info.image_size, steps, open_stream)


def verification_sets(config, image_size: int) -> dict[str, tuple]:
  """name -> (images (2N, S, S, 3), issame (N,)) for every target."""
  from npcface_jax import verification_bin  # noqa: PLC0415 (needs Pillow)
  sets = {}
  for path in config_checks.verification_targets(config):
    try:
      pairs = verification_bin.load_pairs(path, image_size)
    except ValueError as e:
      raise config_checks.ConfigError(
          f'config.verification_targets: {e}') from None
    name = os.path.splitext(os.path.basename(path))[0]
    if pairs.skipped:
      logging.warning('%s: %d pairs left out, an image does not decode: %s',
                      name, len(pairs.skipped), '; '.join(pairs.skipped[:3]))
    sets[name] = (pairs.images, pairs.issame)
  syn = config.synthetic
  if config.dataset == 'synthetic' and syn.heldout_identities:
    sets['synthetic_heldout'] = synthetic_pairs(
        range(syn.num_classes, syn.num_classes + syn.heldout_identities),
        syn.heldout_samples, syn.heldout_pairs, syn.image_size, config.seed,
        syn.noise)
  return sets


def synthetic_pairs(classes, samples_per_class: int, num_pairs: int,
                    image_size: int, seed: int, noise: float):
  """Half matched, half mismatched pairs of held-out synthetic identities."""
  classes = list(classes)
  images, _ = input_pipeline.synthetic_examples(
      classes, samples_per_class, image_size, seed, noise=noise)
  rng = np.random.default_rng([seed, len(classes), num_pairs])
  k, n = samples_per_class, len(classes)
  index, issame = [], []
  for i in range(num_pairs):
    same = i % 2 == 0
    a = rng.integers(n)
    b = a if same else (a + rng.integers(1, n)) % n
    sa, sb = rng.choice(k, 2, replace=False) if same else rng.integers(k, size=2)
    index += [a * k + sa, b * k + sb]
    issame.append(same)
  return images[np.asarray(index)], np.asarray(issame)


# --- The loop ----------------------------------------------------------------

class Outcome(NamedTuple):
  state: TrainState
  verification: dict[str, dict]  # target -> the last evaluation's result
  preempted: bool


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (one process;
  several processes agree on a step through orbax/JAX's preemption sync)."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if (jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint after this step, then '
                    'exiting')
    self.requested = True

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def make_task(config, mesh: Mesh, data: Data) -> Task:
  tx, schedule = create_optimizer(config, data.steps_per_epoch)
  head = registry.get_head(config.head, **config_checks.head_options(config))
  shards = mesh.shape['model']
  num_sample = classifier.num_sampled(
      config.sample_rate,
      classifier.padded_num_classes(data.num_classes, shards) // shards)
  if num_sample is not None:
    split = _batch_axis(head, mesh) is not None
    try:
      classifier.check_sampling(
          data.num_classes, shards, num_sample,
          config.batch_size // (mesh.shape['data'] if split else 1))
    except ValueError as e:
      raise config_checks.ConfigError(
          f'config.sample_rate = {config.sample_rate}: {e}') from e
  return Task(
      model=create_model(config), mesh=mesh, head=head,
      criterion=registry.get_criterion(
          config.criterion, **config_checks.criterion_options(config)),
      tx=tx, schedule=schedule, num_classes=data.num_classes,
      image_size=data.image_size, embedding_dim=config.embedding_dim,
      chunk_size=config.chunk_size or None, seed=config.seed,
      num_sample=num_sample)


def total_steps(config, data: Data) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(round(config.num_epochs * data.steps_per_epoch))


class _Verifier:
  """Periodic verification with the best result per target kept on disk."""

  def __init__(self, config, workdir, mesh, image_size, writer):
    self.sets = verification_sets(config, image_size)
    self.embedder = evaluate.Embedder(create_model(config, train_dtype=False),
                                      mesh, config.eval_batch_size,
                                      config.eval_flip)
    self.writer = writer
    self.path = os.path.join(workdir, 'eval', 'verification.json')
    self.record = {'best': {}, 'history': []}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.record = json.load(f)

  def __call__(self, step: int, state: TrainState) -> dict[str, dict]:
    results = {}
    for name, (images, issame) in self.sets.items():
      r = evaluate.verify(self.embedder, eval_variables(state), images, issame)
      best = self.record['best'].get(name)
      if best is None or r['accuracy'] > best['accuracy']:
        best = self.record['best'][name] = {'accuracy': r['accuracy'],
                                            'step': step}
      results[name] = r
      logging.info('step %d verification %s: %.2f%% +- %.2f (best %.2f%% at '
                   'step %d)', step, name, 100 * r['accuracy'],
                   100 * r['accuracy_std'], 100 * best['accuracy'],
                   best['step'])
      self.writer.write_scalars(step, {
          f'verify/{name}/accuracy': r['accuracy'],
          f'verify/{name}/best': best['accuracy']})
    if results and jax.process_index() == 0:
      self.record['history'].append(
          {'step': step, **{n: r['accuracy'] for n, r in results.items()}})
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        json.dump(self.record, f, indent=1)
      os.replace(tmp, self.path)
    return results


RUN_INFO = 'run.json'


def write_run_info(workdir: str, config, data: Data) -> None:
  """workdir/run.json: the config and the data's sizes, so that evaluation
  (python -m npcface_jax.evaluate) rebuilds the model from the workdir, and
  the head's options as trained (NPCFace's preset filled in)."""
  head = registry.get_head(config.head, **config_checks.head_options(config))
  info = {'config': json.loads(config.to_json_best_effort()),
          'head_options': head.options, 'image_size': data.image_size,
          'num_classes': data.num_classes}
  path = os.path.join(workdir, RUN_INFO)
  with open(path + '.tmp', 'w') as f:
    json.dump(info, f, indent=1)
  os.replace(path + '.tmp', path)


def train_and_evaluate(config, workdir: str) -> Outcome:
  """Trains (or resumes training) in ``workdir`` as ``config`` says."""
  from clu import metric_writers  # noqa: PLC0415 (imports TensorFlow)

  config_checks.check(config, num_devices=jax.device_count(),
                      process_count=jax.process_count())
  mesh = make_mesh(config.model_parallel)
  data = open_data(config, mesh)
  task = make_task(config, mesh, data)
  num_steps = total_steps(config, data)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    write_run_info(workdir, config, data)

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  checkpoints = checkpoint.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=config.keep_checkpoints,
      every_steps=config.checkpoint_every_steps)
  target = abstract_state(task)
  restored = checkpoints.restore(target)
  if restored is None:
    state, position, step = init_state(task), None, 0
    logging.info('starting: %d steps of %d (%d per epoch), %d classes, '
                 '%s devices as %s', num_steps, config.batch_size,
                 data.steps_per_epoch, data.num_classes, jax.device_count(),
                 dict(mesh.shape))
    writer.write_hparams(_flat(config.to_dict()))
  else:
    state, position, step = restored
    logging.info('resumed from the checkpoint of step %d (input at %s)',
                 step, position)
  stream = data.open(position)
  train_step = make_train_step(task, jax.tree.map(lambda s: s.sharding,
                                                  target))
  verifier = _Verifier(config, workdir, mesh, data.image_size, writer)
  results: dict[str, dict] = {}
  if step == 0 and config.eval_at_start:
    results = verifier(0, state)

  preemption = _Preemption()
  pending: list[dict] = []
  images_per_step = config.batch_size
  last_time, last_step = time.time(), step
  unchecked: list[tuple[int, Array]] = []  # (step, its nonfinite flag)
  try:
    while step < num_steps:
      state, metrics = train_step(state, next(stream))
      step += 1
      pending.append(metrics)
      unchecked.append((step, metrics['nonfinite']))
      due_log = step % config.log_every_steps == 0 or step == num_steps
      if due_log or checkpoints.should_save(step):  # never save past a NaN
        _check_finite(unchecked, config.nonfinite, checkpoints)
        unchecked = []
      if due_log:
        summary = {k: float(np.mean(v)) for k, v in
                   _stack(jax.device_get(pending)).items()}
        now = time.time()
        rate = (step - last_step) / max(now - last_time, 1e-9)
        summary['images_per_second'] = rate * images_per_step
        summary['epoch'] = step / data.steps_per_epoch
        writer.write_scalars(step, summary)
        npc = ('  hard %.2f x%.1f  margin %.3f' % (
            summary['npcface/hard_share'], summary['npcface/hard_count'],
            summary['npcface/margin']) if 'npcface/margin' in summary else '')
        logging.info('step %d/%d  loss %.4f  acc %.3f  lr %.4g%s  %.1f img/s  '
                     'ETA %s', step, num_steps, summary['loss'],
                     summary['accuracy'], summary['learning_rate'], npc,
                     summary['images_per_second'],
                     _duration((num_steps - step) / max(rate, 1e-9)))
        pending, last_time, last_step = [], now, step
      checkpoints.save(step, state, stream.state())
      if config.eval_every_steps and step % config.eval_every_steps == 0 and (
          step < num_steps):
        results = verifier(step, state)
      if preemption.requested or _peers_preempted(checkpoints, step):
        if checkpoints.latest_step() != step:
          checkpoints.save(step, state, stream.state(), force=True)
        checkpoints.wait()
        logging.warning('preempted: checkpoint of step %d written; rerun '
                        'with the same --workdir to resume', step)
        return Outcome(state, results, True)
    if checkpoints.latest_step() != step:
      checkpoints.save(step, state, stream.state(), force=True)
    checkpoints.wait()  # a failed write surfaces here, not at exit
    results = verifier(step, state)
    return Outcome(state, results, False)
  finally:
    preemption.close()
    checkpoints.close()
    writer.flush()


class NonFiniteLoss(RuntimeError):
  """The loss or the gradient became NaN or infinite (config.nonfinite =
  'stop'); the update of that step was not applied."""


def _check_finite(unchecked, policy: str, checkpoints) -> None:
  """Stops at the first step whose loss or gradient was not finite, or, with
  policy 'skip', warns for each one (their updates were never applied)."""
  flags = jax.device_get([flag for _, flag in unchecked])
  for (step, _), flag in zip(unchecked, flags):
    if not flag:
      continue
    if policy == 'skip':
      logging.warning('step %d: loss or gradient not finite; the step was '
                      'skipped (config.nonfinite=skip)', step)
      continue
    raise NonFiniteLoss(
        f'step {step}: the loss or the gradient is NaN or infinite. Its '
        'update was not applied and training stopped; the newest checkpoint '
        f'(step {checkpoints.latest_step()}) holds the last good state and '
        'a rerun resumes from it. Lower config.learning_rate, set '
        'config.grad_clip_norm, or set config.nonfinite=skip to skip such '
        'steps.')


def _peers_preempted(checkpoints, step) -> bool:
  return jax.process_count() > 1 and checkpoints.reached_preemption(step)


def _stack(dicts: list[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([np.asarray(d[k]) for d in dicts]) for k in dicts[0]}


def _flat(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v if isinstance(v, (int, float, str, bool)) else (
          str(v))
  return out


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
