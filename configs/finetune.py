"""Fine-tuning a run (trained here, or imported with import_model) on your
data: the backbone, its options, the embedding size and the input contract
are the run's own, read from its run.json, so the command line names only
the run and the data:

    python -m npcface_jax.main --config=configs/finetune.py:RUN_DIR \
        --workdir=DIR --config.dataset=PREPARED

Prepare the data at the run's image size (112 for every imported model).
The classifier starts at the new classes' mean embeddings and trains alone
for the first 20 steps; then everything trains at a tenth of the
paper's learning rate. Any field can still be overridden.
"""

from configs import default
from npcface_jax.faces import images
from npcface_jax.serving import run_dir


def get_config(run: str):
  c = default.get_config()
  if not run:
    raise ValueError('name the run to fine-tune: '
                     '--config=configs/finetune.py:RUN_DIR')
  source, _ = run_dir.load_run(run)
  c.model = source.model
  c.model_options = dict(source.get('model_options') or {})
  c.embedding_dim = source.embedding_dim
  c.input = images.input_contract(source)._asdict()
  c.init_from = run
  c.freeze_backbone_steps = 20
  c.learning_rate = 0.01
  return c
