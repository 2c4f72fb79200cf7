"""The paper's CASIA-WebFace recipe: MobileFaceNet, batch 128, SGD momentum
0.9, weight decay 5e-4, lr 0.1 divided by 10 at epochs 16, 24 and 28 of 30,
NPCFace t=1.1, alpha=0.25, m0=0.4, m1=0.2, random flip.

Pass a head name to rerun a comparison of Tables I-IV with that head's
default options, e.g. ``--config=configs/casia_mobileface.py:arcface``;
``dataset`` is the output of ``python -m data_prep train`` on CASIA-WebFace.
"""

from configs import default


def get_config(head: str = 'npcface'):
  c = default.get_config()
  c.dataset = ''  # required: --config.dataset=/path/to/casia_prep
  c.model = 'mobilefacenet'
  c.batch_size = 128
  c.num_epochs = 30
  c.lr_boundaries = (16, 24, 28)
  c.head = head
  return c
