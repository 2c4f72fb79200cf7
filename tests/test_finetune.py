"""Fine-tuning from another run (finetune.py, config.init_from) and the
frozen backbone (config.freeze_backbone_steps): the backbone restored bit
for bit, the classifier at the new data's class means (against NumPy, on
one shard and two), the frozen steps exact, every fault of the source run
named, and a resumed run that ignores init_from. The small backbone
(tests/tiny_backbone.py) throughout."""

import dataclasses
import logging
import shutil

import jax
import numpy as np
import pytest

from npcface_jax import models
from npcface_jax.common import arrays
from npcface_jax.common import checkpoint
from npcface_jax.serving import run_dir
from npcface_jax.training import (config_checks, data_source, finetune, loop,
                                  setup, train_step)
from tests import tiny_backbone
from tests.conftest import NUM_DEVICES
from tests.test_train import _config
from tests.tiny_backbone import TinyNet

# The new data: 45 classes (padded to 46 rows over 2 'model' devices), 32
# images an epoch, so some classes go unseen; another seed than the source.
NEW = {'synthetic.num_classes': 45, 'synthetic.epoch_examples': 32, 'seed': 1}


def _task(config, mesh):
  data = data_source.open_data(config, mesh)
  task = setup.make_task(config, mesh, data)
  return data, dataclasses.replace(
      task, model=TinyNet(config.embedding_dim, task.model.dtype))


def _host(tree):
  return jax.tree.map(np.array, jax.device_get(tree))


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A source run (TINY, 61 classes): run.json and checkpoints of steps 1
  and 2, whose backbones are no fresh one's (the initial state moved at
  random, BatchNorm variances kept positive, rather than trained: a train
  step's compile would double the fixture's time); (workdir, {step: its
  backbone variables as numpy})."""
  workdir = tmp_path_factory.mktemp('source')
  c = _config()
  data, task = _task(c, arrays.make_mesh(1))
  state = setup.init_state(task)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  rng, saved = np.random.default_rng(0), {}
  ckpt = checkpoint.Checkpointer(str(workdir / 'checkpoints'), keep=3,
                                 every_steps=1)
  for i in (1, 2):
    moved = _host(setup.eval_variables(state))
    moved = jax.tree.map(
        lambda x: np.abs(x + rng.normal(0, 0.1, x.shape).astype(x.dtype)),
        moved)
    state = jax.device_put(state.replace(
        params={**state.params, 'backbone': moved['params']},
        batch_stats=moved['batch_stats'], step=np.int32(i)), shardings)
    ckpt.save(i, state, {'step': i})
    saved[i] = moved
  ckpt.close()
  run_dir.write_run_info(str(workdir), c, data,
                         setup.create_head(c).options)
  return workdir, saved


def _assert_equal_trees(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)


def _class_means_numpy(task, data, variables):
  """The class-mean rows and counts from the same epoch, embedded outside
  any mesh (model.apply on host batches), grouped and averaged in NumPy."""
  stream = data.open(None)
  sums = np.zeros((task.num_classes, task.embedding_dim))
  counts = np.zeros(task.num_classes, int)
  for _ in range(data.steps_per_epoch):
    batch = jax.device_get(next(stream))
    e = np.asarray(task.model.apply(variables, batch['image'], train=False),
                   np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    np.add.at(sums, batch['label'], e)
    np.add.at(counts, batch['label'], 1)
  return sums / np.linalg.norm(sums, axis=1, keepdims=True).clip(1e-30), counts


@pytest.mark.parametrize('model_parallel,step', [(1, None), (2, 1)],
                         ids=['unsharded-newest', 'model2-step1'])
def test_backbone_restored_and_classifier_at_class_means(
    source, model_parallel, step, caplog):
  """The backbone and its statistics are the source checkpoint's bit for
  bit (the newest, or STEP); each class's row is the normalised mean of its
  normalised embeddings over one epoch, as NumPy computes it; unseen
  classes keep the random row, padding stays zero, the rows are laid out as
  the classifier; the head and the optimizer state are fresh."""
  workdir, saved = source
  spec = str(workdir) if step is None else f'{workdir}:{step}'
  c = _config(**NEW, init_from=spec, model_parallel=model_parallel)
  data, task = _task(c, arrays.make_mesh(model_parallel))
  caplog.set_level(logging.INFO)
  state = finetune.init_state(task, data, c)
  variables = saved[step or 2]
  assert jax.tree.leaves(variables['batch_stats'])
  _assert_equal_trees(_host(setup.eval_variables(state)), variables)

  want, counts = _class_means_numpy(task, data, variables)
  fresh = _host(setup.init_state(task))
  w = np.asarray(jax.device_get(state.params['classifier']))
  assert w.shape == (task.padded_classes, 32)
  assert task.padded_classes == 45 + (model_parallel - 1)
  np.testing.assert_array_equal(w[45:], 0.0)
  seen = counts > 0
  assert 0 < seen.sum() < 45  # some classes unseen in 32 images
  np.testing.assert_allclose(w[:45][seen], want[seen], atol=1e-5)
  np.testing.assert_array_equal(w[:45][~seen],
                                fresh.params['classifier'][:45][~seen])
  target = setup.abstract_state(task)
  assert state.params['classifier'].sharding == (
      target.params['classifier'].sharding)
  _assert_equal_trees(_host(state.opt_state), fresh.opt_state)
  _assert_equal_trees(_host([state.params['head'], state.head_state]),
                      [fresh.params['head'], fresh.head_state])
  assert (f'backbone (parameters, BatchNorm statistics) from {workdir}, '
          f'step {step or 2}') in caplog.text
  assert (f'class means of 32 images of one epoch: {seen.sum()} of 45 '
          f'classes, {45 - seen.sum()} unseen') in caplog.text


def test_frozen_backbone_steps_are_exact():
  """freeze_backbone_steps=2: after two steps the backbone, its BatchNorm
  statistics and its momentum are bit for bit as they started while the
  classifier moved; the third step moves them all. (The state is a fresh
  one: where the backbone came from is no matter to the step.)"""
  c = _config(**NEW, model_parallel=2, freeze_backbone_steps=2)
  data, task = _task(c, arrays.make_mesh(2))
  state = setup.init_state(task)
  step = train_step.make_train_step(
      task, setup.state_shardings(task, state), c.freeze_backbone_steps)

  def backbone(s):
    momentum = s.opt_state[-1][0].trace  # add_decayed_weights, then sgd
    return _host([s.params['backbone'], s.batch_stats,
                  momentum['backbone']]), _host(momentum['classifier'])

  stream = data.open(None)
  states = [_host(state)]
  parts = [backbone(state)]
  for _ in range(3):
    state, _ = step(state, next(stream))
    states.append(_host(state))
    parts.append(backbone(state))
  _assert_equal_trees(parts[2][0], parts[0][0])
  assert not np.any(parts[0][1]) and np.any(parts[2][1])
  assert not np.array_equal(states[2].params['classifier'],
                            states[0].params['classifier'])
  for moved, kept in zip(parts[3][0], parts[2][0]):  # params, stats, momentum
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(moved), jax.tree.leaves(kept)))


def test_faults_of_the_source_run_are_named(source, tmp_path):
  """A different backbone, embedding size or image size, a missing
  workdir, run.json or checkpoint, and a STEP that is not there, each named
  with its fix before anything is read or computed; a bad form, with the
  frozen steps, in the config check that lists every problem."""
  workdir, _ = source
  check = finetune.check_source

  def fails(match, image_size=32, **overrides):
    with pytest.raises(config_checks.ConfigError, match=match):
      check(_config(**{'init_from': str(workdir), **overrides}), image_size)

  assert check(_config(init_from=str(workdir)), 32) == (str(workdir), 2)
  fails(r"config.embedding_dim is 32 there but 16 here \(use "
        r"config.embedding_dim=32\)", embedding_dim=16)
  fails(r"config.model is 'mobilefacenet' there but 'resnet50' here \(use "
        r"config.model='mobilefacenet'\)", model='resnet50')
  fails(r"config.model_options is \{'width': 0.125\} there but "
        r"\{'width': 0.25\} here", **{'model_options.width': 0.25})
  fails(r'the image size is 32 there but 48 here \(use data prepared at '
        r'32x32', image_size=48)
  fails(r"config.input is InputContract\(channels='RGB', center=127.5, "
        r"scale=128.0\) there but .*channels='BGR'.* here \(use "
        r'--config.input.channels=RGB --config.input.center=127.5 '
        r'--config.input.scale=128.0\)', **{'input.channels': 'BGR'})
  assert check(_config(init_from=str(workdir), **{
      'model_options.impl': 'matmul'}), 32).step == 2  # same parameters
  fails(r'is not a directory: name the --workdir', init_from=str(
      tmp_path / 'nowhere'))
  fails(r'run.json not found', init_from=str(tmp_path))
  (tmp_path / 'fresh').mkdir()
  shutil.copy(workdir / run_dir.RUN_INFO, tmp_path / 'fresh')
  fails(r'no checkpoint in .*fresh/checkpoints: train that run',
        init_from=str(tmp_path / 'fresh'))
  fails(r'no checkpoint of step 5 in .*; it has steps \[1, 2\]',
        init_from=f'{workdir}:5')

  bad = _config(init_from=f'{workdir}:latest', freeze_backbone_steps=-1,
                momentum=1.5)
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.check(bad, num_devices=NUM_DEVICES)
  for part in ("config.init_from = '", ":latest': STEP 'latest' is not a "
               'step number', 'config.freeze_backbone_steps = -1: must be',
               'config.momentum = 1.5'):
    assert part in str(e.value)


@pytest.mark.parametrize('spec,parts', [
    ('/runs/a', ('/runs/a', None)), ('/runs/a:120', ('/runs/a', 120)),
    ('gs://bucket/run', ('gs://bucket/run', None)),
    ('gs://bucket/run:0', ('gs://bucket/run', 0)),
    ('/runs/a:', "STEP '' is not a step number"),
    ('/runs/a:-3', "STEP '-3' is not a step number"),
    (':12', 'no WORKDIR')])
def test_init_from_forms(spec, parts):
  if isinstance(parts, tuple):
    assert config_checks.init_from_parts(spec) == parts
  else:
    with pytest.raises(ValueError, match=parts):
      config_checks.init_from_parts(spec)


@pytest.mark.slow
def test_resumed_run_ignores_init_from(source, tmp_path, monkeypatch, caplog):
  """Through the loop (training/loop.py): a fine-tuning run (its first step
  frozen) stopped at step 2 resumes from its own checkpoint, even with its
  source gone: init_from is never read again. Slow: two runs of the loop, with
  TensorFlow and clu, about 15 s of CPU."""
  monkeypatch.setattr(models, 'from_config', tiny_backbone.create_model)
  origin = tmp_path / 'origin'
  shutil.copytree(source[0], origin)
  c = _config(**NEW, init_from=str(origin), freeze_backbone_steps=1,
              num_train_steps=2, checkpoint_every_steps=2)
  caplog.set_level(logging.INFO)
  first = loop.train_and_evaluate(c, str(tmp_path / 'work'))
  assert int(first.state.step) == 2 and 'fine-tuning: backbone' in caplog.text
  caplog.clear()
  shutil.rmtree(origin)
  monkeypatch.setattr(finetune, 'init_state', None)  # a call would fail
  c.num_train_steps = 3
  resumed = loop.train_and_evaluate(c, str(tmp_path / 'work'))
  assert int(resumed.state.step) == 3
  assert 'resumed from the checkpoint of step 2' in caplog.text
  assert f"config.init_from = '{origin}' ignored" in caplog.text
