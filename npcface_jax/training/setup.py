"""A training run set up from its config: the backbone, the head and
criterion, the optimizer and its schedule, and the train state laid out
over the mesh (common/arrays.make_mesh). The step (train_step.py) and the
loop (loop.py) are built from them; evaluation and serving are not
(serving/trained_run.py builds its backbone with models.from_config).

Layout over the mesh ('data', 'model'): the backbone is data parallel over
every device; the classifier's rows (and a head's per-class parameters,
with their optimizer state) are split over 'model', everything else is
replicated (docs/architecture.md, "Sharding").
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from npcface_jax import models
from npcface_jax.common.arrays import l2_normalize
from npcface_jax.loss import class_shards, classifier, heads, registry
from npcface_jax.training import config_checks

Array = jax.Array
_INIT_RNG = 2  # the seed's stream for the initial state (train_step: 1, 3)


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
  head: heads.Head
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
  classifier_init_std: float = 0.0  # 0: unit-norm rows, else normal(0, std)

  @property
  def padded_classes(self) -> int:
    return class_shards.padded_num_classes(self.num_classes,
                                           self.mesh.shape['model'])


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


def _path_keys(path) -> list:
  return [getattr(k, 'key', getattr(k, 'name', None)) for k in path]


def param_name(path) -> str:
  """A parameter's path as 'backbone/EmbeddingHead_0/BatchNorm_1/scale'
  (what config.frozen_params' patterns are matched against)."""
  return '/'.join(str(k) for k in _path_keys(path))


def clip_by_global_norm_of(max_norm: float, scope: str
                           ) -> optax.GradientTransformation:
  """Clips the global norm of the gradients in ``scope``: 'all' (optax's
  clip_by_global_norm) or 'backbone', the backbone's gradients alone,
  clipped by PyTorch's rule (scaled by max_norm / (norm + 1e-6) where
  that is below 1), the classifier's and the head's left as they are,
  as arcface_torch's train_v2.py does
  (``clip_grad_norm_(backbone.parameters(), 5)``)."""
  if scope == 'all':
    return optax.clip_by_global_norm(max_norm)
  if scope != 'backbone':
    raise ValueError(f"grad_clip_scope must be 'all' or 'backbone', got "
                     f'{scope!r}')

  def update(updates, state, params=None):
    del params
    inside = [x for p, x in jax.tree_util.tree_leaves_with_path(updates)
              if 'backbone' in _path_keys(p)]
    norm = optax.tree.norm(inside)
    coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x * coef.astype(x.dtype)
        if 'backbone' in _path_keys(p) else x, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      update)


def frozen_patterns(config) -> list[str]:
  spec = getattr(config, 'frozen_params', '') or ''
  return [p.strip() for p in spec.split(',') if p.strip()]


def create_optimizer(config, steps_per_epoch: int):
  """SGD with momentum and weight decay on every parameter, as the paper's
  PyTorch recipe (decay added to the gradient, after optional clipping,
  over every parameter or the backbone's: grad_clip_scope). Parameters
  matching config.frozen_params get no update at all (no decay, no
  momentum, left out of the clipped norm), as PyTorch's
  ``requires_grad=False``."""
  schedule = learning_rate_schedule(config, steps_per_epoch)
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(clip_by_global_norm_of(
        config.grad_clip_norm, getattr(config, 'grad_clip_scope', 'all')))
  if config.weight_decay > 0:
    parts.append(optax.add_decayed_weights(config.weight_decay))
  parts.append(optax.sgd(schedule, momentum=config.momentum or None))
  tx = optax.chain(*parts)
  patterns = frozen_patterns(config)
  if patterns:
    compiled = [re.compile(p) for p in patterns]

    def labels(params):
      names = [param_name(p)
               for p, _ in jax.tree_util.tree_leaves_with_path(params)]
      for c in compiled:
        if not any(c.search(n) for n in names):
          raise config_checks.ConfigError(
              f'config.frozen_params: {c.pattern!r} matches no parameter '
              f'(they are named like {names[0]!r})')
      return jax.tree_util.tree_map_with_path(
          lambda p, _: 'frozen' if any(c.search(param_name(p))
                                       for c in compiled) else 'train',
          params)

    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()},
                               labels)
  return tx, schedule


def _model(config):
  try:
    return models.from_config(config)
  except ValueError as e:
    raise config_checks.ConfigError(str(e)) from e


def create_head(config) -> heads.Head:
  return registry.get_head(config.head, **config_checks.head_options(config))


def _num_sample(config, mesh: Mesh, head: heads.Head, num_classes: int):
  """Partial FC's rows scored per shard (None: all)."""
  try:
    return classifier.rows_to_sample(config.sample_rate, num_classes, head,
                                     mesh, config.batch_size)
  except ValueError as e:
    raise config_checks.ConfigError(
        f'config.sample_rate = {config.sample_rate}: {e}') from e


def make_task(config, mesh: Mesh, data) -> Task:
  """The task of ``config`` on ``data`` (its num_classes, image_size and
  steps_per_epoch: a data_source.Data)."""
  tx, schedule = create_optimizer(config, data.steps_per_epoch)
  head = create_head(config)
  return Task(
      model=_model(config), mesh=mesh, head=head,
      criterion=registry.get_criterion(
          config.criterion, **config_checks.criterion_options(config)),
      tx=tx, schedule=schedule, num_classes=data.num_classes,
      image_size=data.image_size, embedding_dim=config.embedding_dim,
      chunk_size=config_checks.chunk_size(config, head), seed=config.seed,
      num_sample=_num_sample(config, mesh, head, data.num_classes),
      classifier_init_std=float(getattr(config, 'classifier_init_std', 0.0)))


def _sharding_of(path, leaf, mesh, per_class: frozenset[str]):
  """Classifier rows and a head's per-class parameters, with their optimizer
  state, split over 'model'; everything else replicated."""
  keys = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
  rows = 'classifier' in keys or ('head' in keys and per_class & set(keys))
  if rows and getattr(leaf, 'ndim', 0) >= 1:
    return NamedSharding(mesh, P('model'))
  return NamedSharding(mesh, P())


def state_shardings(task: Task, abstract: TrainState):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: _sharding_of(p, x, task.mesh, task.head.per_class_params),
      abstract)


def _init_state(task: Task, key: Array) -> TrainState:
  k_model, k_cls, k_head = jax.random.split(key, 3)
  images = jnp.zeros((1, task.image_size, task.image_size, 3), jnp.float32)
  variables = task.model.init(k_model, images, train=False)
  rows, c = task.padded_classes, task.num_classes
  # Unit-norm random class centres (FaceX-Zoo's renorm init), or normal(0,
  # std) entries (arcface_torch's PartialFC_V2: 0.01), then zero padding
  # rows, which the heads mask out and which stay zero.
  w = jax.random.normal(k_cls, (c, task.embedding_dim), jnp.float32)
  w = (w * task.classifier_init_std if task.classifier_init_std > 0
       else l2_normalize(w))
  w = jnp.pad(w, [(0, rows - c), (0, 0)])
  pad_rows = lambda a: jnp.pad(  # noqa: E731
      a, [(0, rows - c)] + [(0, 0)] * (a.ndim - 1))
  head_params = {k: pad_rows(v) if k in task.head.per_class_params else v
                 for k, v in task.head.init_params(k_head, c).items()}
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


def init_state(task: Task, target: TrainState | None = None) -> TrainState:
  """A fresh state from the task's seed, laid out over the mesh
  (``target``: the task's abstract_state, when the caller has it)."""
  if target is None:
    target = abstract_state(task)
  init = jax.jit(functools.partial(_init_state, task),
                 out_shardings=jax.tree.map(lambda s: s.sharding, target))
  return init(jax.random.fold_in(jax.random.key(task.seed), _INIT_RNG))


def eval_variables(state: TrainState) -> dict:
  """The backbone's variables for inference (embedding.Embedder)."""
  return {'params': state.params['backbone'], 'batch_stats': state.batch_stats}
