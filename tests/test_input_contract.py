"""The input contract (faces/images.InputContract): how a network wants
its pixels, read from a run's config, checked, and applied the same way by
the embedding step and the exported graph."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from npcface_jax import models
from npcface_jax.common import arrays
from npcface_jax.evaluation import embedding_step
from npcface_jax.faces import images
from npcface_jax.serving import export_formats
from npcface_jax.training import config_checks
from tests.conftest import NUM_DEVICES
from tests.helpers import fresh_rng, random_variables


def test_normalize_follows_the_contract():
  rng, _ = fresh_rng()
  pixels = rng.uniform(0, 255, (2, 4, 4, 3))
  np.testing.assert_array_equal(images.normalize(pixels),
                                (pixels - 127.5) / 128.0)
  bgr = images.InputContract('BGR', 127.5, 127.5)
  np.testing.assert_allclose(images.normalize(pixels, bgr),
                             (pixels[..., ::-1] - 127.5) / 127.5)
  for contract in (None, bgr, images.InputContract('RGB', 0.0, 255.0)):
    np.testing.assert_allclose(
        images.denormalize(images.normalize(pixels, contract), contract),
        pixels)
  assert bgr.describe() == 'BGR, (x - 127.5) / 127.5'


def test_a_runs_contract_and_its_faults():
  """Old configs (no config.input) were RGB, 127.5, 128; a bad field is a
  config error naming it."""
  assert images.input_contract(ml_collections.ConfigDict()) == (
      images.InputContract())
  assert images.input_contract({'input': {'channels': 'BGR', 'center': 127.5,
                                          'scale': 127.5}}) == (
      images.InputContract('BGR', 127.5, 127.5))
  config = default.get_config()
  assert images.input_contract(config) == images.InputContract()
  config.input.channels = 'bgr'
  config.input.scale = 0.0
  with pytest.raises(config_checks.ConfigError,
                     match="config.input.channels must be 'RGB' or 'BGR', "
                     "got 'bgr'"):
    config_checks.check(config, num_devices=NUM_DEVICES)
  config.input.channels = 'BGR'
  with pytest.raises(config_checks.ConfigError,
                     match='config.input: center must be a number and scale '
                     'a positive one'):
    config_checks.check(config, num_devices=NUM_DEVICES)


@pytest.mark.parametrize('contract', [
    images.InputContract(), images.InputContract('BGR', 127.5, 127.5)])
def test_embedder_and_export_apply_the_same_contract(contract):
  """uint8 faces through the embedding step and through the export's
  serving function equal the backbone on the contract's inputs."""
  rng, seed = fresh_rng()
  model = models.create('mobilefacenet', width=0.25, embedding_dim=16)
  variables = random_variables(model, (1, 32, 32, 3), seed)
  pixels = rng.integers(0, 256, (NUM_DEVICES, 32, 32, 3), dtype=np.uint8)
  inputs = jnp.asarray(images.normalize(pixels.astype(np.float32), contract))
  want = np.asarray(arrays.l2_normalize(model.apply(variables, inputs,
                                                    train=False)))
  embedder = embedding_step.Embedder(model, arrays.make_mesh(1),
                                     NUM_DEVICES, contract=contract)
  np.testing.assert_allclose(embedder(variables, pixels), want, atol=1e-5)
  served = export_formats.serving_function(model, variables, False, contract)
  np.testing.assert_allclose(served(jnp.asarray(pixels)), want, atol=1e-5)
