"""The embedded default: NPCFace on synthetic identities, no dataset, a few
minutes on a laptop CPU. A reduced MobileFaceNet (quarter width, 48x48
faces) learns 100 identities and is then verified on 40 identities it has
never seen, with the LFW protocol; the log ends with that accuracy, beside
the untrained network's.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.dataset = 'synthetic'
  c.synthetic.num_classes = 100
  c.synthetic.image_size = 48
  c.synthetic.epoch_examples = 2048
  c.synthetic.heldout_identities = 40
  c.model_options.width = 0.25
  c.embedding_dim = 128
  c.batch_size = 64
  c.num_epochs = 8
  c.lr_boundaries = (5, 7)
  c.learning_rate = 0.1
  c.head_options.npcface.scale = 32.0
  c.log_every_steps = 16
  c.checkpoint_every_steps = 64
  c.eval_every_steps = 0
  c.eval_batch_size = 64
  return c
