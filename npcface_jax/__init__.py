"""NPCFace loss and face-recognition trainer in JAX.

The loss core is public API for use from any JAX code:

    from npcface_jax import npcface_logits, softmax_cross_entropy
    loss = softmax_cross_entropy(npcface_logits(cos, labels), labels)
"""

from npcface_jax.heads import (
    NPCFACE_PRESETS,
    adacos_init_state,
    adacos_logits,
    adam_init_margins,
    adam_project_margins,
    adam_softmax_logits,
    arcface_logits,
    arcnegface_logits,
    cosface_logits,
    curricularface_init_state,
    curricularface_logits,
    mv_am_softmax_logits,
    mv_arc_softmax_logits,
    npcface_logits,
    softmax_logits,
    sphereface_init_state,
    sphereface_logits,
)
from npcface_jax.losses import (
    focal_loss,
    ohem_loss,
    per_sample_cross_entropy,
    softmax_cross_entropy,
)
from npcface_jax.registry import HeadOutput, get_criterion, get_head

__version__ = '0.1.0'
