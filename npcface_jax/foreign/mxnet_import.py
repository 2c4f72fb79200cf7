"""An insightface MXNet model (symbol + params) as this project's backbone,
checked.

``load`` reads both files without MXNet (mxnet_params), recognises the
graph and its variant (mxnet_layouts), builds the backbone those options
give and puts the weights onto it; ``parity`` runs that backbone (float32,
as every command will) and the graph itself, computed in float64 NumPy
(mxnet_graph.run, from MXNet's operator semantics) on the same faces, both
fed the same normalised inputs (the graph without its own preprocessing),
and returns each face's cosine between the two.

The input contract is the graph's: its preprocessing ops ((x - 127.5) *
0.0078125 in fresnet and fmobilefacenet) on RGB, as MXNet decodes images
and insightface's iterators feed them.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import numpy as np

from npcface_jax.faces import images
from npcface_jax.foreign import (backbone, mxnet_graph, mxnet_layouts,
                                 mxnet_params)


AGAINST = ('the MXNet graph itself, computed in float64 NumPy from MXNet\'s '
           'operator semantics (npcface_jax/foreign/mxnet_graph.py)')

class Imported(NamedTuple):
  """A backbone ready to write as a run: what to build and its weights."""
  model: str
  options: dict  # model_options
  embedding_dim: int
  variables: dict  # {'params', 'batch_stats'}, float32 NumPy
  contract: images.InputContract  # the graph's preprocessing
  source: str  # who wrote it, in words
  layout: mxnet_layouts.Layout
  image_size: int
  params: dict  # the params file's arrays, as stored
  symbol: str  # the symbol file's path


def symbol_beside(params_path: str) -> str:
  """The symbol file Module.save_checkpoint writes beside a params file:
  'model-0000.params' -> 'model-symbol.json'."""
  base = re.sub(r'(-\d+)?\.params$', '', params_path)
  return f'{base}-symbol.json'


def load(params_path: str, symbol_path: str | None = None) -> Imported:
  """The model as a backbone; MxnetFileError for files that are not what
  MXNet writes, LayoutError for a graph that is not a backbone this
  project has (each naming the file and the fault)."""
  symbol_path = symbol_path or symbol_beside(params_path)
  if not os.path.isfile(symbol_path):
    raise mxnet_params.MxnetFileError(
        f'{params_path}: its symbol file {symbol_path} is not there: give '
        'the -symbol.json as the second file')
  params = mxnet_params.read_params(params_path)
  graph = mxnet_params.read_symbol(symbol_path)
  try:
    layout = mxnet_layouts.detect(graph, params)
  except mxnet_layouts.LayoutError as e:
    raise mxnet_layouts.LayoutError(f'{symbol_path}: {e}') from None
  imported = Imported(layout.model, layout.options, layout.embedding_dim, {},
                      layout.contract, f'insightface MXNet ({layout.family})',
                      layout, layout.image_size, params, symbol_path)
  try:
    variables = mxnet_layouts.to_variables(
        layout, backbone.variable_shapes(imported, layout.image_size))
  except mxnet_layouts.LayoutError as e:
    raise mxnet_layouts.LayoutError(
        f'{params_path} with {symbol_path}: {e}') from None
  return imported._replace(variables=variables)


def reference(imported: Imported, inputs: np.ndarray) -> np.ndarray:
  """The graph's float64 embedding (fc1) of normalised NHWC inputs."""
  x = np.asarray(inputs, np.float64).transpose(0, 3, 1, 2)
  graph = imported.layout.graph
  return np.concatenate([
      mxnet_graph.run(graph, imported.params, x[i:i + 8],
                      outputs=['fc1_output'])['fc1_output']
      for i in range(0, len(x), 8)])


def parity(imported: Imported, pixels: np.ndarray,
           contract: images.InputContract) -> np.ndarray:
  """Each face's cosine between our backbone (float32) and the graph
  (float64), both fed ``pixels`` (uint8 RGB, N x S x S) through
  ``contract``."""
  inputs = images.normalize(np.asarray(pixels, np.float32), contract)
  return backbone.cosines(backbone.embed(imported, inputs),
                           reference(imported, inputs))
