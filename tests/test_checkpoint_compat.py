"""A run trained before the restructuring of issue 15 (tests/data/
checkpoint_c383c96: AdaM-softmax with per-class margins, classes sharded
over 2 devices) still works: its run.json reads back, its whole train state
restores leaf for leaf into the state the trainer builds today (what a
resumed run starts from), and evaluation gets the same embeddings."""

import pathlib
import shutil

import jax
import numpy as np
import pytest

from npcface_jax import models
from npcface_jax.common import arrays
from npcface_jax.evaluation import embedding_step
from npcface_jax.serving import run_dir
from tests.test_faults import _restore

FIXTURE = (pathlib.Path(__file__).resolve().parent / 'data'
           / 'checkpoint_c383c96')


@pytest.fixture
def old_run(tmp_path):
  """A copy of the old workdir (restoring may tidy a checkpoint folder)."""
  workdir = tmp_path / 'old_run'
  shutil.copytree(FIXTURE, workdir)
  config, image_size = run_dir.load_run(str(workdir))
  return workdir, config, image_size, np.load(workdir / 'expected.npz')


def test_the_old_state_restores_leaf_for_leaf(old_run):
  workdir, config, _, expected = old_run
  assert config.head == 'adam_softmax' and config.model_parallel == 2
  (state, position, step), steps = _restore(workdir, config)
  assert (step, position, steps) == (2, {'step': 2}, [2])
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  want = {k[len('state'):]: expected[k] for k in expected.files
          if k.startswith('state')}
  got = {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}
  assert sorted(got) == sorted(want)
  for key, value in got.items():
    np.testing.assert_array_equal(value, want[key], err_msg=key)
  # The margins are still laid out like the classifier's rows.
  assert state.params['head']['margins'].sharding.spec == (
      state.params['classifier'].sharding.spec)


def test_evaluation_gets_the_old_embeddings(old_run):
  workdir, config, image_size, expected = old_run
  mesh = arrays.make_mesh(1)
  variables, step = run_dir.restore_variables(str(workdir), mesh)
  embedder = embedding_step.Embedder(
      models.from_config(config, train_dtype=False), mesh, 8)
  got = embedder(variables, expected['images'])
  assert step == 2 and image_size == 32
  np.testing.assert_allclose(got, expected['embeddings'], rtol=1e-5,
                             atol=1e-6)
