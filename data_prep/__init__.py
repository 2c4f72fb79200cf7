"""Face datasets into the trainer's formats, from the formats users have.

Three commands (``python -m data_prep --help``):

  train SRC OUT   an image folder, a ``path label`` list or an insightface /
                  im2rec ``.rec`` into TFRecord shards with tfds metadata,
                  ``label_map.json`` and ``report.json`` (README,
                  "Preparing data");
  pairs PAIRS IMAGES OUT.bin
                  an LFW-style pairs file into an insightface verification
                  ``.bin`` (read back with
                  ``npcface_jax.evaluation.bin_format``);
  check OUT       every record of a ``train`` output verified before a long
                  run (framing checksums, images, labels, counts).

train and pairs run every image through the same
``preprocess.prepare_face``, so training and verification images match.
Modules: ``recordio`` (MXNet RecordIO without mxnet), ``sources`` (what SRC
holds), ``preprocess`` (read, decode, detect (--detect), align or resize
through ``npcface_jax.faces.images.read_face``, then JPEG; in parallel),
``shards`` (TFRecords and tfds metadata), ``train_set``, ``pairs`` and
``check`` (the three commands). data_prep is the command line on top of
npcface_jax: it imports ``npcface_jax.faces`` (images, detection,
alignment), ``npcface_jax.common`` (jsonfile, textfile),
``npcface_jax.evaluation.bin_format`` and ``npcface_jax.data`` (tfrecords,
and input_pipeline's metadata for check); nothing in npcface_jax imports
data_prep.
"""


class DataPrepError(Exception):
  """A problem with the user's input or options; the message says the fix."""
