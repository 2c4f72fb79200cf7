"""The pair sets a run verifies on, read from its config alone: its .bin
targets (config.verification_targets) and, on synthetic data, the held-out
identities. Training verifies on them as it goes; evaluate --run_sets and
export's parity check use the same sets, without the trainer."""

from __future__ import annotations

import logging
import os

from npcface_jax.data import synthetic
from npcface_jax.faces import images
from npcface_jax.evaluation import bin_format


def targets(config) -> list[str]:
  """The .bin paths of config.verification_targets (comma-separated)."""
  return [p.strip() for p in str(config.verification_targets).split(',')
          if p.strip()]


def verification_sets(config, image_size: int) -> dict[str, tuple]:
  """name -> (images (2N, S, S, 3), issame (N,)) for every set; ValueError
  naming config.verification_targets and the file for one that cannot be
  read."""
  sets = {}
  for path in targets(config):
    try:
      pairs = bin_format.load_pairs(path, image_size)
    except ValueError as e:
      raise ValueError(f'config.verification_targets: {e}') from None
    name = os.path.splitext(os.path.basename(path))[0]
    if pairs.skipped:
      logging.warning('%s: %d pairs left out, an image does not decode: %s',
                      name, len(pairs.skipped), '; '.join(pairs.skipped[:3]))
    sets[name] = (pairs.images, pairs.issame)
  syn = config.synthetic
  if config.dataset == 'synthetic' and syn.heldout_identities:
    sets['synthetic_heldout'] = synthetic.synthetic_pairs(
        range(syn.num_classes, syn.num_classes + syn.heldout_identities),
        syn.heldout_samples, syn.heldout_pairs, syn.image_size, config.seed,
        syn.noise, images.input_contract(config))
  return sets
