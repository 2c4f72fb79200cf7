"""A small backbone for tests of the trainer, and the trainer's command line
with it.

``python -m tests.tiny_backbone --workdir=DIR [npcface_jax.main's flags]``
is ``python -m npcface_jax.main`` with TinyNet in place of the configured
backbone (``python -m tests.tiny_backbone sweep|evaluate ...`` the same
for ``npcface_jax.sweep`` and ``npcface_jax.evaluate``): the command
line, distributed start-up, signals, checkpoints and input pipeline are
the real ones, only the compile is seconds shorter. It
imports nothing from the test suite's conftest, so JAX_NUM_CPU_DEVICES in
its environment decides its device count.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from npcface_jax import models
from npcface_jax.models import layers


class TinyNet(nn.Module):
  """A small backbone with the parts that matter to the step's layout
  (convolution, BatchNorm statistics, dropout): compiles in a second,
  where MobileFaceNet takes twenty."""

  embedding_dim: int = 32
  dtype: Any = None

  @nn.compact
  def __call__(self, images, train: bool):
    x = layers.Conv(8, 3, 2, dtype=self.dtype)(images.astype(
        self.dtype or images.dtype))
    x = layers.PReLU()(layers.batch_norm(train, self.dtype)(x))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    x = nn.Dense(self.embedding_dim, dtype=self.dtype)(
        x.reshape(x.shape[0], -1))
    return layers.batch_norm(train, self.dtype)(x).astype(jnp.float32)


_configured_model = models.from_config


def create_model(config, *, train_dtype: bool = True):
  """models.from_config's signature and dtype rule, returning TinyNet."""
  return TinyNet(config.embedding_dim, _configured_model(
      config, train_dtype=train_dtype).dtype)


if __name__ == '__main__':
  import importlib
  import sys
  from absl import app
  # Its XLA:CPU flags take effect: nothing has started a backend yet.
  models.from_config = create_model
  command = sys.argv[1] if sys.argv[1:2] in (['sweep'], ['evaluate']) else ''
  module = importlib.import_module(f'npcface_jax.{command or "main"}')
  if command:  # main defines its flags on import, the others when run
    del sys.argv[1]
    module._define_flags()  # noqa: SLF001 (as their __main__ does)
  app.run(module.main)
