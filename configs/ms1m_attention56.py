"""The paper's MS1M recipe: Attention-56, batch 512, SGD momentum 0.9,
weight decay 5e-4, lr 0.1 divided by 10 at epochs 8, 14 and 18 of 20, NPCFace
with the paper's parameters. ``--config=configs/ms1m_attention56.py:arcface``
selects another head; ``dataset`` is data_prep's output for MS1M.
"""

from configs import default


def get_config(head: str = 'npcface'):
  c = default.get_config()
  c.dataset = ''  # required: --config.dataset=/path/to/ms1m_prep
  c.model = 'attention56'
  c.batch_size = 512
  c.num_epochs = 20
  c.lr_boundaries = (8, 14, 18)
  c.head = head
  c.checkpoint_every_steps = 5000
  c.eval_every_steps = 20000
  return c
