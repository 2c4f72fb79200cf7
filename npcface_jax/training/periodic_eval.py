"""Verification during training: the config's pair sets (its .bin targets,
and held-out synthetic identities for the synthetic data), embedded with
the current backbone every config.eval_every_steps and at the end, each
with its best result kept in workdir/eval/verification.json."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from npcface_jax import models
from npcface_jax.common import jsonfile
from npcface_jax.evaluation import embedding_step, protocols, run_sets
from npcface_jax.faces import images
from npcface_jax.training import config_checks, setup


class Verifier:
  """``verifier(step, state) -> {target: result}``: 10-fold verification
  of every set, logged, written to TensorBoard, the best kept on disk."""

  def __init__(self, config, workdir: str, mesh, image_size: int, writer):
    try:
      self.sets = run_sets.verification_sets(config, image_size)
    except ValueError as e:
      raise config_checks.ConfigError(str(e)) from None
    self._say_folds()
    self.embedder = embedding_step.Embedder(
        models.from_config(config, train_dtype=False), mesh,
        config.eval_batch_size, config.eval_flip,
        images.input_contract(config))
    self.writer = writer
    self.path = os.path.join(workdir, 'eval', 'verification.json')
    self.record = {'best': {}, 'history': []}
    if os.path.exists(self.path):
      self.record = jsonfile.read_object(self.path)

  def _say_folds(self) -> None:
    """Logs each set's folds once (the labels' layout chooses them:
    protocols.fold_assignment); a set too small to fold fails now, not at
    the first verification."""
    for name, (_, issame) in self.sets.items():
      try:
        folds = protocols.fold_assignment(np.asarray(issame))
      except ValueError as e:
        raise config_checks.ConfigError(
            f'verification set {name}: {e}') from None
      logging.info('verification set %s: %d pairs, %d folds (%s)', name,
                   len(issame), folds.count, folds.rule)

  def _one(self, step: int, name: str, result: dict) -> None:
    best = self.record['best'].get(name)
    if best is None or result['accuracy'] > best['accuracy']:
      best = self.record['best'][name] = {'accuracy': result['accuracy'],
                                          'step': step}
    logging.info('step %d verification %s: %.2f%% +- %.2f (best %.2f%% at '
                 'step %d)', step, name, 100 * result['accuracy'],
                 100 * result['accuracy_std'], 100 * best['accuracy'],
                 best['step'])
    self.writer.write_scalars(step, {
        f'verify/{name}/accuracy': result['accuracy'],
        f'verify/{name}/best': best['accuracy']})

  def __call__(self, step: int, state: setup.TrainState) -> dict[str, dict]:
    results = {}
    for name, (faces, issame) in self.sets.items():
      results[name] = embedding_step.verify(
          self.embedder, setup.eval_variables(state), faces,
          np.asarray(issame))
      self._one(step, name, results[name])
    if results and jax.process_index() == 0:
      self.record['history'].append(
          {'step': step, **{n: r['accuracy'] for n, r in results.items()}})
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      jsonfile.write_object(self.path, self.record)
    return results
