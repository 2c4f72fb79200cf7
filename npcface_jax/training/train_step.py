"""The train step: one jit over the mesh, ``step(state, batch) -> (state,
metrics)``, with explicit shardings and the state donated.

The backbone runs data parallel; the classifier loss runs on one device's
view when the 'model' axis has size 1, else class-sharded
(classifier.sharded_classifier_loss) as Partial FC does, optionally scoring
a random share of the classes. Gradients are taken in the global view, so
their scale is right whatever the layout. A step whose loss or gradient is
not finite is never applied (the 'nonfinite' metric says so; loop.py
decides to stop or skip). With ``freeze_backbone_steps`` N, the steps
before N leave the backbone as it was (see _freeze_backbone). Needs
neither TensorFlow nor clu.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from npcface_jax.common import arrays
from npcface_jax.loss import classifier
from npcface_jax.training.setup import Task, TrainState

Array = jax.Array
# The seed's streams (setup.py: 2): the step's dropout, Partial FC's
# classes, and a head that draws at random (heads.Given).
_STEP_RNG, _SAMPLE_RNG, _HEAD_RNG = 1, 3, 4


def _classify_fn(task: Task):
  """(embeddings, W, labels, head state, head params, key, head key) ->
  (ce, HeadOutput); the key draws Partial FC's classes, the head key what
  the head draws."""
  if task.mesh.shape['model'] == 1:
    return lambda x, w, y, state, params, key, head_key: (
        classifier.classifier_loss(
            x, w, y, task.head, state, params, num_classes=task.num_classes,
            chunk_size=task.chunk_size, num_sample=task.num_sample, key=key,
            head_key=head_key))
  return classifier.sharded_classifier_loss(
      task.mesh, task.head, task.num_classes, chunk_size=task.chunk_size,
      batch_axis=classifier.split_batch_axis(task.head, task.mesh),
      num_sample=task.num_sample)


def _metrics(task: Task, loss, ce, out, grads, lr) -> dict[str, Array]:
  return {'loss': loss, 'cross_entropy': jnp.mean(ce),
          'accuracy': jnp.mean(out.metrics['top1'].astype(jnp.float32)),
          'grad_norm': optax.tree.norm(grads), 'learning_rate': lr,
          **task.head.diagnostics(out)}


def _at_step(opt_state, step: Array):
  """opt_state with optax's step count(s) (the schedule's) set to ``step``,
  so that a skipped step moves the learning rate on like any other."""
  try:
    return optax.tree_utils.tree_set(opt_state, count=step)
  except KeyError:  # no count in the chain (a constant learning rate)
    return opt_state


def _loss_fn(task: Task, classify, state: TrainState, images, labels, rng,
             keys, with_norms: bool = False):
  """The loss of the params, with (batch stats, head output, per-sample
  loss, norms) as aux; norms: each embedding's norm (B,), without gradient,
  for the hard-sample records, or None without ``with_norms``."""
  def loss_fn(params):
    embeddings, mutated = task.model.apply(
        {'params': params['backbone'], 'batch_stats': state.batch_stats},
        images, train=True, mutable=['batch_stats'], rngs={'dropout': rng})
    embeddings = embeddings.astype(jnp.float32)
    ce, out = classify(embeddings, params['classifier'], labels,
                       state.head_state, params['head'], *keys)
    loss = task.criterion.reduce(ce) + out.aux_loss
    norms = (lax.stop_gradient(arrays.row_norms(embeddings))
             if with_norms else None)
    return loss, (mutated['batch_stats'], out, ce, norms)
  return loss_fn


def _in_backbone(path) -> bool:
  return 'backbone' in [getattr(k, 'key', getattr(k, 'name', None))
                        for k in path]


def _freeze_backbone(new: TrainState, old: TrainState, frozen: Array
                     ) -> TrainState:
  """``new`` with old's backbone where ``frozen``: its parameters, its
  BatchNorm statistics and the optimizer state of its parameters (SGD's
  momentum), so that fine-tuning (finetune.py) trains the new classifier
  and head first on a backbone exactly as restored. The forward still runs
  in training mode (BatchNorm normalises with the batch's statistics,
  dropout is on); only the updates are dropped."""
  keep = lambda n, o: jnp.where(frozen, o, n)  # noqa: E731
  params = dict(new.params, backbone=jax.tree.map(
      keep, new.params['backbone'], old.params['backbone']))
  opt_state = jax.tree_util.tree_map_with_path(
      lambda path, n, o: keep(n, o) if _in_backbone(path) else n,
      new.opt_state, old.opt_state)
  return new.replace(params=params, opt_state=opt_state,
                     batch_stats=jax.tree.map(keep, new.batch_stats,
                                              old.batch_stats))


def _hard_samples(out, norms, margin: float) -> dict[str, Array]:
  """The batch's per-sample hard-sample statistics (hard_samples.py)."""
  c_y, nearest = out.metrics['cos_target'], out.metrics['cos_nearest']
  return {'cos_target': c_y, 'cos_nearest': nearest,
          'misclassified': classifier.misclassified(c_y, nearest, margin),
          'norm': norms}


def make_train_step(task: Task, shardings: TrainState,
                    freeze_backbone_steps: int = 0,
                    analysis_margin: float | None = None):
  """The jitted ``step(state, batch) -> (state, metrics)``, state donated;
  steps before ``freeze_backbone_steps`` leave the backbone unchanged.
  With ``analysis_margin`` the metrics also hold 'hard_samples': each
  sample's cosine to its target and to its nearest negative and whether it
  is mis-classified at that margin (classifier.misclassified), from the
  cosines the loss computed, and its embedding's norm (the quality score
  of MagFace and AdaFace, shown for every head), (B,) each (for the
  hard-sample analysis)."""
  classify = _classify_fn(task)
  all_devices = NamedSharding(task.mesh, P(('data', 'model')))
  base_key = jax.random.fold_in(jax.random.key(task.seed), _STEP_RNG)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(base_key, state.step)
    images = lax.with_sharding_constraint(batch['image'], all_devices)
    # Drawn from the seed and the step alone: a resumed run draws the same.
    keys = (None if task.num_sample is None
            else jax.random.fold_in(rng, _SAMPLE_RNG),
            jax.random.fold_in(rng, _HEAD_RNG) if 'key' in task.head.needs
            else None)
    loss_fn = _loss_fn(task, classify, state, images, batch['label'], rng,
                       keys, with_norms=analysis_margin is not None)
    (loss, (batch_stats, out, ce, norms)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    # The optimizer's schedule runs on state.step, the batches consumed (what
    # lr_boundaries' epochs count, and the logged rate), not on optax's own
    # count, which a skipped step would leave one behind.
    updates, opt_state = task.tx.update(
        grads, _at_step(state.opt_state, state.step), state.params)
    params = optax.apply_updates(state.params, updates)
    params['head'] = task.head.project(params['head'])
    metrics = _metrics(task, loss, ce, out, grads, task.schedule(state.step))
    if analysis_margin is not None:
      metrics['hard_samples'] = _hard_samples(out, norms, analysis_margin)
    new = state.replace(params=params, batch_stats=batch_stats,
                        opt_state=opt_state, head_state=out.state)
    # A NaN or infinite loss or gradient is never applied: the state stays
    # as it was but for the step (the batch is consumed, the schedule moves
    # on), so every checkpoint holds finite numbers.
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics['grad_norm'])
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    if freeze_backbone_steps > 0:
      new = _freeze_backbone(new, state, state.step < freeze_backbone_steps)
    metrics['nonfinite'] = (~finite).astype(jnp.float32)
    return new.replace(step=state.step + 1, opt_state=_at_step(
        new.opt_state, state.step + 1)), metrics

  return jax.jit(step, donate_argnums=0,
                 out_shardings=(shardings, NamedSharding(task.mesh, P())))
