"""Face-recognition backbones in Flax Linen, created by name.

    model = npcface_jax.models.create('mobilefacenet', embedding_dim=512)
    variables = model.init(key, images, train=False)
    embeddings = model.apply(variables, images, train=False)

A backbone maps NHWC images, normalised by images.normalize, to embeddings
(B, D), not normalised; BatchNorm statistics live in the ``batch_stats``
collection.
``dtype`` sets the compute dtype (e.g. jnp.bfloat16); parameters stay
float32. ``impl`` picks the convolution and BatchNorm formulations
(layers.py).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from npcface_jax.models import attention, resnet
from npcface_jax.models.mobilefacenet import MobileFaceNet
from npcface_jax.models.vgg import VGG19

_MODELS: dict[str, Callable[..., nn.Module]] = {
    'attention56': attention.attention56,
    'attention92': attention.attention92,
    'mobilefacenet': MobileFaceNet,
    'resnet18': resnet.resnet18,
    'resnet34': resnet.resnet34,
    'resnet50': resnet.resnet50,
    'resnet101': resnet.resnet101,
    'resnet200': resnet.resnet200,
    'se_resnet50': resnet.se_resnet50,
    'vgg19': VGG19,
}


def names() -> list[str]:
  return sorted(_MODELS)


def from_config(config, *, train_dtype: bool = True) -> nn.Module:
  """The backbone a run's config names (model, embedding_dim,
  model_options, dtype); ``train_dtype=False`` computes in float32
  (evaluation, serving) whatever the training dtype. ValueError naming
  config.model_options when they do not fit the backbone."""
  dtype = jnp.bfloat16 if config.dtype == 'bfloat16' and train_dtype else None
  try:
    return create(config.model, embedding_dim=config.embedding_dim,
                  dtype=dtype, **dict(config.model_options))
  except TypeError as e:
    raise ValueError(
        f'config.model_options = {dict(config.model_options)}: {e}') from e


def create(name: str, **kwargs) -> nn.Module:
  """The backbone called ``name`` with its fields set from ``kwargs``."""
  if name not in _MODELS:
    raise ValueError(f'unknown model {name!r}; choose one of {names()}')
  return _MODELS[name](**kwargs)
