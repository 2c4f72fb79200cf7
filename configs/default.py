"""Every field of a training run; the defaults are the paper's
CASIA-WebFace recipe (MobileFaceNet + NPCFace). The other configs import
this one and change a few fields. Override any field on the command line:

    python -m npcface_jax.main --config=configs/casia_mobileface.py \
        --workdir=/tmp/casia --config.dataset=/data/casia_prep \
        --config.head=arcface --config.head_options.arcface.margin=0.45

NPCFace's options start from a preset (heads.NPCFACE_PRESETS, default
'paper'); fields given beside it win:
``--config.head_options.npcface.preset=facex_zoo
--config.head_options.npcface.scale=64``.
"""

import ml_collections
from ml_collections import config_dict

from npcface_jax.loss import heads, registry


def _options(names, get):
  """Every head's (or criterion's) options with their defaults filled in,
  so each one is overridable; only the selected one is used."""
  out = ml_collections.ConfigDict()
  for name in names:
    out[name] = ml_collections.ConfigDict({
        k: config_dict.placeholder(float) if v is None else v
        for k, v in get(name).options.items()})
  return out


def _npcface_options() -> ml_collections.ConfigDict:
  """NPCFace's ``preset`` (heads.NPCFACE_PRESETS) and its fields, each None
  by default: None takes the preset's value, any other value (set in a
  config or on the command line) wins over it. 'paper' keeps the paper's
  numbers the default. None cannot be given on the command line, so with
  a preset whose hard_margin is set (facex_zoo), hard_margin=<m0> restores
  the paper's threshold."""
  fields = {k: config_dict.placeholder(bool if isinstance(v, bool) else float)
            for k, v in heads.NPCFACE_PRESETS['paper'].items()}
  return ml_collections.ConfigDict({'preset': 'paper', **fields})


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # Data: a data_prep output directory (class count, image size and size of
  # an epoch come from its metadata), or 'synthetic' identities in memory.
  c.dataset = ''
  c.num_classes = -1  # -1: the dataset's; any other value must agree with it
  c.synthetic = ml_collections.ConfigDict(dict(
      num_classes=1000, image_size=112, noise=24.0, epoch_examples=100_000,
      heldout_identities=0, heldout_samples=4, heldout_pairs=600))
  c.flip = True  # random horizontal flip
  c.shuffle_buffer = 16_384
  # A damaged record in the shards (a flaky disk, an interrupted copy) is
  # skipped, named (shard, byte offset) in a warning and counted in
  # run.json's damaged_records; True stops the run at it instead, naming it
  # and the fix (`python -m data_prep check DIR`; re-copy or re-prepare).
  c.strict_records = False

  # Backbone (npcface_jax.models): compute dtype 'float32' or 'bfloat16'; the
  # classifier and the loss always run in float32.
  c.model = 'mobilefacenet'
  c.model_options = ml_collections.ConfigDict()
  c.embedding_dim = 512
  c.dtype = 'float32'
  # The network's input contract (faces/images.InputContract): channel order
  # and (x - center) / scale, applied wherever pixels reach the network. A
  # fine-tune must have its init_from run's (configs/finetune.py reads it);
  # an imported model has its source's.
  c.input = ml_collections.ConfigDict(
      {'channels': 'RGB', 'center': 127.5, 'scale': 128.0})

  # Head and criterion by name, each with its options (loss/registry.py).
  c.head = 'npcface'
  c.head_options = _options(registry.head_names(), registry.get_head)
  c.head_options.npcface = _npcface_options()  # e.g. preset='facex_zoo'
  c.criterion = 'softmax'
  c.criterion_options = _options(registry.criterion_names(),
                                 registry.get_criterion)
  # The fused chunked loss (loss/chunked.py: no (B, C) logits in memory),
  # this many classes per block: -1 (default) 4096 for every head that has
  # a chunked form and the full logits for the others (AdaCos,
  # AdaM-softmax); 0 the full logits; > 0 that block size.
  c.chunk_size = -1
  c.model_parallel = 1  # devices on the 'model' axis, splitting the classes
  # Partial FC: each step scores every target class and a random share of
  # the others, per 'model' shard; 1.0 scores all (README, "Partial FC").
  c.sample_rate = 1.0

  # Optimisation: SGD with momentum; the learning rate divided by lr_decay's
  # inverse at each boundary (in epochs).
  c.batch_size = 128  # global, over all devices and hosts
  c.num_epochs = 30
  c.num_train_steps = -1  # > 0: overrides num_epochs
  c.learning_rate = 0.1
  c.lr_boundaries = (16, 24, 28)
  c.lr_decay = 0.1
  c.warmup_epochs = 0.0
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.grad_clip_norm = 0.0  # > 0: clip the gradients' global norm
  # Whose norm grad_clip_norm clips: 'all' (every gradient) or 'backbone'
  # (the backbone's alone, by PyTorch's clip_grad_norm_ rule; classifier
  # and head unclipped), as arcface_torch's train_v2.py does.
  c.grad_clip_scope = 'all'
  # Parameters that never change (no update, no weight decay, no momentum,
  # out of the clipped norm), as PyTorch's requires_grad=False: comma-
  # separated regular expressions searched in each parameter's path, e.g.
  # 'backbone/EmbeddingHead_0/BatchNorm_1/scale'; '' none. arcface_torch's
  # iresnet freezes its last BatchNorm's weight (features.weight) at 1:
  # 'EmbeddingHead_0/BatchNorm_1/scale'.
  c.frozen_params = ''
  # The classifier's initial rows: 0 unit-norm random (FaceX-Zoo's renorm
  # init); > 0 normal(0, std) entries, as arcface_torch's PartialFC_V2
  # (0.01). The loss normalises the rows, but their norm sets the size of
  # their gradients and so how fast they move.
  c.classifier_init_std = 0.0
  # A NaN or infinite loss is never applied; 'stop' ends the run naming the
  # step (the newest checkpoint is the last good state), 'skip' goes on (the
  # skipped batch counts as a step: the learning rate schedule moves on).
  c.nonfinite = 'stop'
  c.seed = 0

  # Fine-tuning (finetune.py): a fresh run takes its backbone (parameters
  # and BatchNorm statistics) from another run's checkpoint, 'WORKDIR' (its
  # newest) or 'WORKDIR:STEP', and starts its classifier at the class means
  # of its own data's embeddings; '' off. A resumed run ignores it.
  c.init_from = ''
  # Steps during which the backbone (and its BatchNorm statistics and
  # momentum) stays as it was, while the classifier and head train; 0: off.
  c.freeze_backbone_steps = 0

  # Logging, checkpoints and verification.
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.keep_checkpoints = 3
  c.eval_every_steps = 5000  # 0: only at the end
  c.eval_at_start = True  # the untrained network's accuracy, for reference
  c.verification_targets = ''  # comma-separated insightface .bin files
  c.eval_batch_size = 256
  c.eval_flip = True

  # Hard-sample statistics of training batches (training/hard_samples.py, the
  # paper's Figs. 3, 5-7), written to workdir/analysis/stats.jsonl and
  # TensorBoard: every N steps, -1 once an epoch, 0 off. A sample is
  # mis-classified when a negative's cosine is above cos(theta_y + margin)
  # (NPCFace's hard mask at the paper's m_h = 0.4, whatever the head, so
  # that runs compare).
  c.analysis_every_steps = -1
  c.analysis_margin = 0.4
  return c
