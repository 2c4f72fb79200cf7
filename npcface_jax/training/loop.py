"""The training loop: builds the run from its config (setup.py), restores or
starts the state (fresh, or from another run's backbone: finetune.py), feeds
the step (train_step.py) batches from the data
(data_source.py), and around it keeps checkpoints, TensorBoard metrics,
the log, verification (periodic_eval.py), SIGTERM and the NaN policy, and
writes workdir/analysis/: the training curve (metrics.jsonl) and the
hard-sample statistics (stats.jsonl, hard_samples.py).

Needs TensorFlow and clu (for the writer); the step itself needs neither.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import NamedTuple

import jax
import numpy as np

from npcface_jax.common import arrays
from npcface_jax.common import checkpoint, jsonfile, run_log
from npcface_jax.serving import run_dir
from npcface_jax.training import (config_checks, data_source, finetune,
                                  hard_samples, periodic_eval, setup,
                                  train_step)

Array = jax.Array


class Outcome(NamedTuple):
  state: setup.TrainState
  verification: dict[str, dict]  # target -> the last evaluation's result
  preempted: bool


class NonFiniteLoss(RuntimeError):
  """The loss or the gradient became NaN or infinite (config.nonfinite =
  'stop'); the update of that step was not applied."""


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


def _log_line(step: int, num_steps: int, summary: dict) -> str:
  """'step 16/256  loss 4.1  acc 0.52  lr 0.1' and the head's diagnostics
  ('npcface/margin' shows as 'margin')."""
  extra = ''.join(f'  {k.split("/", 1)[1]} {v:.3g}'
                  for k, v in sorted(summary.items()) if '/' in k)
  return (f'step {step}/{num_steps}  loss {summary["loss"]:.4f}  acc '
          f'{summary["accuracy"]:.3f}  lr {summary["learning_rate"]:.4g}'
          f'{extra}')


class _Analysis:
  """Hard-sample statistics (hard_samples.py): the steps' per-sample values
  gathered into a window, written as a record every ``every`` steps and at
  the last step. The values stay on the device until a record or a long
  queue needs them, so that steps are never waited for."""

  def __init__(self, config, workdir: str, writer, steps_per_epoch: int,
               step: int):
    every = config.analysis_every_steps
    self.every = steps_per_epoch if every == -1 else every
    self.margin, self.writer = config.analysis_margin, writer
    self.file = hard_samples.path(workdir) if jax.process_index() == 0 else None
    self.window, self.pending = hard_samples.Window(step + 1), []

  def add(self, hard_samples) -> None:
    self.pending.append(hard_samples)
    if len(self.pending) > 32:  # all but the newest two steps are done
      self._fold(len(self.pending) - 2)

  def _fold(self, count: int) -> None:
    ready, self.pending = self.pending[:count], self.pending[count:]
    for values in jax.device_get(ready):
      self.window.add(**values)

  def __call__(self, step: int, epoch: float, last: bool) -> None:
    if step % self.every and not last:
      return
    self._fold(len(self.pending))
    record = self.window.record(step, epoch, self.margin)
    self.window = hard_samples.Window(step + 1)
    if self.file is None:
      return
    jsonfile.append_line(self.file, record)
    scalars, values = hard_samples.tensorboard(record)
    self.writer.write_scalars(step, scalars)
    self.writer.write_histograms(step, values, num_buckets={
        k: hard_samples.NUM_BINS for k in values})
    logging.info('step %d hard samples: %d of %d mis-classified, r %s, '
                 'overlap %s', step, record['misclassified'],
                 record['samples'], _maybe(record['pearson']),
                 _maybe(record['overlap']))


def _maybe(x) -> str:
  return '-' if x is None else f'{x:.3f}'


class _Run:
  """One training run's parts, built and restored (or started) at once."""

  def __init__(self, config, workdir: str, defaults=None):
    from clu import metric_writers, periodic_actions  # noqa: PLC0415 (TF)
    config_checks.check(config, num_devices=jax.device_count(),
                        process_count=jax.process_count())
    self.config, self.mesh = config, arrays.make_mesh(config.model_parallel)
    self.workdir, self.damage_noted = workdir, 0
    self.data = data_source.open_data(config, self.mesh)
    self.task = setup.make_task(config, self.mesh, self.data)
    self.num_steps = data_source.total_steps(config, self.data)
    os.makedirs(workdir, exist_ok=True)
    lead = jax.process_index() == 0
    if lead:
      run_dir.write_run_info(workdir, config, self.data,
                             self.task.head.options)
    # TensorBoard only: the log gets its own readable lines (run_log.py).
    self.writer = metric_writers.AsyncMultiWriter(
        [metric_writers.SummaryWriter(workdir)] if lead else [])
    self.progress = periodic_actions.ReportProgress(
        num_train_steps=self.num_steps, writer=self.writer,
        every_steps=config.log_every_steps, every_secs=None)
    self.checkpoints = checkpoint.Checkpointer(
        os.path.join(workdir, 'checkpoints'), keep=config.keep_checkpoints,
        every_steps=config.checkpoint_every_steps)
    target = setup.abstract_state(self.task)  # once per start
    self._start(target, defaults)
    self.analysis = None
    if config.analysis_every_steps:
      self.analysis = _Analysis(config, workdir, self.writer,
                                self.data.steps_per_epoch, self.step)
    self.step_fn = train_step.make_train_step(
        self.task, jax.tree.map(lambda s: s.sharding, target),
        config.freeze_backbone_steps,
        config.analysis_margin if self.analysis else None)
    self.metrics_file = (hard_samples.path(workdir, hard_samples.METRICS)
                         if lead else None)
    self.verifier = periodic_eval.Verifier(config, workdir, self.mesh,
                                           self.data.image_size, self.writer)

  def _start(self, target, defaults) -> None:
    restored = self.checkpoints.restore(target)
    c, data = self.config, self.data
    if restored is None:
      self.state, position, self.step = self._fresh_state(target), None, 0
      logging.info('starting: %d steps of %d (%d per epoch), %d classes, '
                   '%s devices as %s', self.num_steps, c.batch_size,
                   data.steps_per_epoch, data.num_classes, jax.device_count(),
                   dict(self.mesh.shape))
      self.writer.write_hparams(c.to_dict())  # clu flattens it
    else:
      self.state, position, self.step = restored
      logging.info('resumed from the checkpoint of step %d (input at %s)',
                   self.step, position)
      if c.init_from:
        logging.info('config.init_from = %r ignored: the run resumes from '
                     'its own checkpoint', c.init_from)
    if defaults is not None:
      logging.info('config (fields unlike configs/default.py):\n%s', '\n'.join(
          run_log.config_lines(c, defaults, self.task.head.options)))
    self.stream = data.open(position)

  def _fresh_state(self, target) -> setup.TrainState:
    """A new state laid out as ``target``: from the seed, or with
    config.init_from's backbone and class-mean classifier rows
    (finetune.py)."""
    if self.config.init_from:
      return finetune.init_state(self.task, self.data, self.config, target)
    return setup.init_state(self.task, target)

  def log(self, pending: list) -> None:
    """Writes and logs the mean of the metrics since the last log; the
    learning rate is the schedule's at the last step (a mean over a window
    where it drops from 0.1 to 0.01 would read 0.0794, a rate never used)."""
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(pending))
    summary = {k: float(np.mean(v)) for k, v in stacked.items()}
    summary['learning_rate'] = float(stacked['learning_rate'][-1])
    summary['epoch'] = self.step / self.data.steps_per_epoch
    self.writer.write_scalars(self.step, summary)
    if self.metrics_file:
      jsonfile.append_line(self.metrics_file, {'step': self.step, **summary})
    logging.info('%s', _log_line(self.step, self.num_steps, summary))
    self.note_damage()

  def note_damage(self) -> None:
    """The damaged records the input skipped since the last note (each
    already named in a warning): summed up in the log and kept in
    run.json by the first process (of its own share of the data)."""
    damaged = list(getattr(self.stream, 'damaged', ()))
    if len(damaged) == self.damage_noted:
      return
    self.damage_noted = len(damaged)
    logging.warning('input: %d damaged record(s) skipped so far, %d '
                    'example(s) fewer in every epoch (run.json, '
                    '"%s")', len(damaged),
                    sum(d['examples'] for d in damaged), run_dir.DAMAGED)
    if jax.process_index() == 0:
      run_dir.record_damage(self.workdir, damaged)

  def save(self, force: bool = False) -> None:
    if not force or self.checkpoints.latest_step() != self.step:
      self.checkpoints.save(self.step, self.state, self.stream.state(),
                            force=force)

  def close(self) -> None:
    self.note_damage()
    self.checkpoints.close()
    self.writer.flush()


def _preempted(run: _Run, preemption: _Preemption) -> bool:
  peers = jax.process_count() > 1 and run.checkpoints.reached_preemption(
      run.step)
  return preemption.requested or peers


def _loop(run: _Run, preemption: _Preemption) -> Outcome:
  config, results = run.config, {}
  if run.step == 0 and config.eval_at_start:
    results = run.verifier(0, run.state)
  pending: list[dict] = []
  unchecked: list[tuple[int, Array]] = []  # (step, its nonfinite flag)
  while run.step < run.num_steps:
    run.state, metrics = run.step_fn(run.state, next(run.stream))
    run.step += 1
    hard_samples = metrics.pop('hard_samples', None)
    pending.append(metrics)
    unchecked.append((run.step, metrics['nonfinite']))
    due_log = (run.step % config.log_every_steps == 0
               or run.step == run.num_steps)
    if due_log or run.checkpoints.should_save(run.step):  # never past a NaN
      _check_finite(unchecked, config.nonfinite, run.checkpoints)
      unchecked = []
    if due_log:
      run.log(pending)
      pending = []
    if run.analysis:
      run.analysis.add(hard_samples)
      run.analysis(run.step, run.step / run.data.steps_per_epoch,
                   run.step == run.num_steps)
    run.progress(run.step)
    run.save()
    if config.eval_every_steps and run.step % config.eval_every_steps == 0 and (
        run.step < run.num_steps):
      with run.progress.timed('verification'):
        results = run.verifier(run.step, run.state)
    if _preempted(run, preemption):
      run.save(force=True)
      run.checkpoints.wait()
      logging.warning('preempted: checkpoint of step %d written; rerun '
                      'with the same --workdir to resume', run.step)
      return Outcome(run.state, results, True)
  run.save(force=True)
  run.checkpoints.wait()  # a failed write surfaces here, not at exit
  return Outcome(run.state, run.verifier(run.step, run.state), False)


def train_and_evaluate(config, workdir: str, defaults=None) -> Outcome:
  """Trains (or resumes training) in ``workdir`` as ``config`` says; with
  ``defaults`` (a config), logs the fields of ``config`` unlike them."""
  run = _Run(config, workdir, defaults)
  preemption = _Preemption()
  try:
    return _loop(run, preemption)
  finally:
    preemption.close()
    run.close()
