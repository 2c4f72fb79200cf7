"""The training data of a config: its sizes (classes, image side, steps per
epoch) and how to open its stream at a position, from a data_prep output
directory (input_pipeline.py) or synthetic identities (synthetic.py)."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
from jax.sharding import Mesh

from npcface_jax.data import input_pipeline, synthetic
from npcface_jax.faces import images
from npcface_jax.training import config_checks


class Data(NamedTuple):
  """The training data's sizes, and how to open its stream at a position."""
  num_classes: int
  image_size: int
  steps_per_epoch: int
  open: Callable[[Any], Any]  # start (a stream state() or None) -> iterator


def open_data(config, mesh: Mesh) -> Data:
  """Sizes from data_prep's metadata (or the synthetic config), checked
  against config.num_classes."""
  image_dtype = 'bfloat16' if config.dtype == 'bfloat16' else 'float32'
  contract = images.input_contract(config)
  if config.dataset == 'synthetic':
    syn = config.synthetic
    config_checks.check_num_classes(config, syn.num_classes)
    stream = functools.partial(
        synthetic.synthetic_stream, syn.num_classes, config.batch_size, mesh,
        syn.image_size, config.seed, noise=syn.noise, dtype=image_dtype,
        contract=contract)
    return Data(syn.num_classes, syn.image_size,
                syn.epoch_examples // config.batch_size,
                lambda start: stream(start=start))
  info = input_pipeline.dataset_info(config.dataset)
  config_checks.check_num_classes(config, info.num_classes)

  def open_stream(start):
    return input_pipeline.train_stream(
        config.dataset, config.batch_size, mesh, seed=config.seed,
        start=start, flip=config.flip, dtype=image_dtype,
        shuffle_buffer=config.shuffle_buffer,
        strict=bool(config.get('strict_records', False)), contract=contract)

  steps = input_pipeline.steps_per_epoch(info, config.batch_size, mesh,
                                         jax.process_count())
  return Data(info.num_classes, info.image_size, steps, open_stream)


def total_steps(config, data: Data) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(round(config.num_epochs * data.steps_per_epoch))
