"""A released PyTorch face network as this project's backbone, checked.

``load`` reads the checkpoint without torch (torch_checkpoint), recognises
its layout and variant (torch_layouts), builds the backbone those options
give and puts the weights onto it; ``parity`` runs that backbone (float32,
as every command will) and the source architecture's float64 NumPy
forward (reference_nets) on the same faces, fed by the source's input
contract, and returns each face's cosine between the two.

What the weights cannot show is each source's documented default:
arcface_torch trains RGB, (x - 127.5) / 127.5 (its transforms.Normalize
of 0.5, 0.5); FaceX-Zoo reads faces with OpenCV (BGR) and feeds (x - 127.5)
/ 128 (data_processor/test_dataset.py); AdaFace feeds BGR, (x - 127.5) /
127.5 ("IMPORTANT: BGR" in its README); all of them PyTorch's BatchNorm
eps 1e-5. A bare face.evoLVe IR state dict (neither FaceX-Zoo's
``backbone.`` nor AdaFace's ``model.``) has no known contract: the caller
must state it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from npcface_jax.faces import images
from npcface_jax.foreign import (backbone, reference_nets, torch_checkpoint,
                                 torch_layouts)

ARCFACE_TORCH = images.InputContract('RGB', 127.5, 127.5)
FACEX_ZOO = images.InputContract('BGR', 127.5, 128.0)
ADAFACE = images.InputContract('BGR', 127.5, 127.5)
IMAGE_SIZE = 112  # every layout here: the IR's 7x7 map, MobileFaceNet's GDC
AGAINST = ('a float64 NumPy forward of the source architecture '
           '(npcface_jax/foreign/reference_nets.py)')


class Imported(NamedTuple):
  """A backbone ready to write as a run: what to build and its weights."""
  model: str
  options: dict  # model_options
  embedding_dim: int
  variables: dict  # {'params', 'batch_stats'}, float32 NumPy
  contract: images.InputContract | None  # None: the source does not say
  source: str  # who wrote it, in words ('AdaFace (face.evoLVe IR)')
  layout: torch_layouts.Layout
  checkpoint: torch_checkpoint.TorchCheckpoint


def _source(layout: torch_layouts.Layout) -> tuple[str, Any]:
  if layout.family.startswith('arcface_torch'):
    return f'insightface arcface_torch ({layout.family})', ARCFACE_TORCH
  if layout.family == 'FaceX-Zoo MobileFaceNet':
    return 'FaceX-Zoo (MobileFaceNet)', FACEX_ZOO
  prefix = layout.prefix.split('.')
  if 'model' in prefix:
    return 'AdaFace (face.evoLVe IR)', ADAFACE
  if 'backbone' in prefix:
    return 'FaceX-Zoo (face.evoLVe IR)', FACEX_ZOO
  return 'face.evoLVe IR (origin unknown)', None


def load(path: str) -> Imported:
  """The checkpoint at ``path`` as a backbone; TorchFileError for a file
  that is not a safe PyTorch checkpoint, LayoutError for one whose
  tensors are not a backbone this project has (both naming the fault)."""
  ckpt = torch_checkpoint.read_state_dict(path)
  layout = torch_layouts.detect(ckpt.tensors)
  source, contract = _source(layout)
  imported = Imported(layout.model, layout.options, layout.embedding_dim,
                      {}, contract, source, layout, ckpt)
  try:
    variables = torch_layouts.to_variables(
        layout, backbone.variable_shapes(imported, IMAGE_SIZE))
  except torch_layouts.LayoutError as e:
    raise torch_layouts.LayoutError(f'{path}: {e}') from None
  return imported._replace(variables=variables)


def reference(imported: Imported, inputs: np.ndarray) -> np.ndarray:
  """The source architecture's float64 forward of normalised NHWC inputs."""
  forward = (reference_nets.mobilefacenet if imported.model ==
             'mobilefacenet' else reference_nets.iresnet)
  sd = {n: np.asarray(v, np.float64)
        for n, v in imported.layout.tensors.items()}
  x = np.asarray(inputs, np.float64).transpose(0, 3, 1, 2)
  return np.concatenate([forward(sd, x[i:i + 8])
                         for i in range(0, len(x), 8)])


def parity(imported: Imported, pixels: np.ndarray,
           contract: images.InputContract) -> np.ndarray:
  """Each face's cosine between our backbone (float32) and the source's
  computation (float64), both fed ``pixels`` (uint8 RGB, N x 112 x 112)
  through ``contract``."""
  inputs = images.normalize(np.asarray(pixels, np.float32), contract)
  return backbone.cosines(backbone.embed(imported, inputs),
                           reference(imported, inputs))
