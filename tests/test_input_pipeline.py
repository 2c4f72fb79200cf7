"""The input pipeline on small data_prep-shaped directories written here:
pixels and labels survive the trip, each example comes once per epoch and
per process, flips are seeded, batches are sharded on 'data', and a resumed
stream continues bit for bit; the synthetic stream likewise, without
TensorFlow."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from npcface_jax.data import input_pipeline as ip, synthetic
from npcface_jax.faces import images
from tests.conftest import NUM_DEVICES
from tests.helpers import SHARED_DATA, orl_people

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')

SIZE = 112
SHARDS = (13, 9, 10)  # 32 examples in three uneven files.
NUM_CLASSES = 5


def write_dataset(out, images, labels, shard_lengths, num_classes):
  """A directory in data_prep's layout; returns the stored JPEG bytes."""
  out.mkdir(parents=True, exist_ok=True)
  encoded, k = [], 0
  for s, n in enumerate(shard_lengths):
    name = f'npcface-train.tfrecord-{s:05d}-of-{len(shard_lengths):05d}'
    with tf.io.TFRecordWriter(str(out / name)) as writer:
      for _ in range(n):
        jpeg = tf.io.encode_jpeg(images[k], quality=90).numpy()
        encoded.append(jpeg)
        writer.write(tf.train.Example(features=tf.train.Features(feature={
            'image': tf.train.Feature(bytes_list=tf.train.BytesList(
                value=[jpeg])),
            'label': tf.train.Feature(int64_list=tf.train.Int64List(
                value=[int(labels[k])])),
        })).SerializeToString())
        k += 1
  size = images.shape[1]
  tfds.folder_dataset.write_metadata(
      data_dir=str(out),
      features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(size, size, 3),
                                       encoding_format='jpeg'),
          'label': tfds.features.ClassLabel(
              names=[f'id{c}' for c in range(num_classes)]),
      }),
      split_infos=[tfds.core.SplitInfo(name='train',
                                       shard_lengths=list(shard_lengths),
                                       num_bytes=0)])
  return encoded


class Data:
  """A written dataset and a way to name each decoded image by its index."""

  def __init__(self, path, encoded, labels, shard_lengths):
    self.path, self.labels = str(path), np.asarray(labels)
    # Pillow's decode (evaluation's): the pipeline must give the same pixels.
    self.decoded = [np.asarray(images.decode(e)) for e in encoded]
    self._index = {d.tobytes(): i for i, d in enumerate(self.decoded)}
    self.shard_of = np.repeat(np.arange(len(shard_lengths)), shard_lengths)

  def identify(self, images):
    """(example index, flipped) per normalised image; pixels must be exact."""
    pixels = np.asarray(images, np.float32) * 128.0 + 127.5
    assert np.array_equal(pixels, np.round(pixels)), 'not (x - 127.5) / 128'
    found = []
    for u in pixels.astype(np.uint8):
      if u.tobytes() in self._index:
        found.append((self._index[u.tobytes()], False))
      else:
        flipped = u[:, ::-1].tobytes()
        assert flipped in self._index, 'image is no stored JPEG decode'
        found.append((self._index[flipped], True))
    return found


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  n = sum(SHARDS)
  labels = np.arange(n) % NUM_CLASSES
  rng = np.random.default_rng(0)
  faces = synthetic.prototypes(labels, SIZE, seed=3)
  faces += rng.normal(0, 20, faces.shape)
  images = np.clip(faces, 0, 255).astype(np.uint8)
  out = tmp_path_factory.mktemp('ds')
  return Data(out, write_dataset(out, images, labels, SHARDS, NUM_CLASSES),
              labels, SHARDS)


def _mesh(shape=(NUM_DEVICES, 1)):
  return jax.make_mesh(shape, ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.fixture(scope='module')
def mesh():
  assert jax.device_count() == NUM_DEVICES, 'conftest should fake 8 devices'
  return _mesh()


def _take(it, n):
  return [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(n)]


def test_dataset_info(data):
  info = ip.dataset_info(data.path)
  assert (info.num_classes, info.num_examples, info.image_size) == (
      NUM_CLASSES, sum(SHARDS), SIZE)
  assert info.shard_lengths == SHARDS and len(info.files) == len(SHARDS)


def test_round_trip_labels_normalisation_and_sharding(data, mesh):
  it = ip.train_stream(data.path, 8, mesh, flip=False)
  assert it.steps_per_epoch == 4
  seen = []
  for _ in range(it.steps_per_epoch):
    batch = next(it)
    for arr in batch.values():
      assert isinstance(arr.sharding, NamedSharding)
      assert arr.sharding.spec == P('data')
    assert batch['image'].shape == (8, SIZE, SIZE, 3)
    assert batch['image'].dtype == jnp.float32
    assert batch['label'].shape == (8,) and batch['label'].dtype == jnp.int32
    images, labels = np.asarray(batch['image']), np.asarray(batch['label'])
    for (i, flipped), image, label in zip(data.identify(images), images,
                                          labels):
      assert not flipped
      np.testing.assert_array_equal(
          image, (data.decoded[i].astype(np.float32) - 127.5) / 128.0)
      assert label == data.labels[i]
      seen.append(i)
  assert sorted(seen) == list(range(sum(SHARDS)))
  assert it.state() == {'epoch': 1, 'index': 0}


def test_explicit_mesh_and_model_axis(data):
  """jax.make_mesh's default (Explicit) axes; the 'model' axis replicates."""
  mesh = jax.make_mesh((4, 2), ('data', 'model'))
  batch = next(ip.train_stream(data.path, 8, mesh, dtype=jnp.bfloat16))
  assert batch['image'].shape == (8, SIZE, SIZE, 3)
  assert batch['image'].dtype == jnp.bfloat16
  assert batch['image'].sharding.spec == P('data')
  shard = batch['image'].addressable_shards[0]
  assert shard.data.shape == (2, SIZE, SIZE, 3)


def test_flip_is_seeded_and_about_half(data, mesh):
  def flips(seed):
    it = ip.train_stream(data.path, 8, mesh, seed=seed)
    return [f for b in _take(it, 8) for f in data.identify(b['image'])]
  a, b = flips(1), flips(1)
  assert a == b
  share = np.mean([f for _, f in a])
  assert 0.3 < share < 0.7, f'{share:.2f} of the images flipped'
  assert flips(2) != a


def test_epochs_reshuffle(data, mesh):
  it = ip.train_stream(data.path, 8, mesh, flip=False)
  order = [i for b in _take(it, 8) for i, _ in data.identify(b['image'])]
  assert sorted(order[:32]) == sorted(order[32:]) == list(range(32))
  assert order[:32] != order[32:]


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_shares(data, mesh, process_count):
  """2 processes split the 3 files, 4 split the records by index."""
  shares = ip.split_files(SHARDS, process_count)
  assert (shares is None) == (process_count > len(SHARDS))
  per_epoch = {}
  for p in range(process_count):
    it = ip.train_stream(data.path, 8, mesh, flip=False, process_index=p,
                         process_count=process_count)
    assert it.batch_size == 8 // process_count
    per_epoch[p] = []
    for _ in range(2):
      ids = [i for _ in range(it.steps_per_epoch)
             for i, _ in data.identify(it.next_local()['image'])]
      assert len(ids) == len(set(ids)) == it.epoch_length
      if shares is not None:
        assert set(data.shard_of[ids]) <= set(shares[p])
      per_epoch[p].append(set(ids))
  lengths = {len(s) for epochs in per_epoch.values() for s in epochs}
  assert len(lengths) == 1, 'processes yielded different epoch lengths'
  for e in range(2):
    union = set().union(*(per_epoch[p][e] for p in per_epoch))
    assert len(union) == process_count * lengths.pop(), 'shares overlap'
    lengths.add(len(per_epoch[0][e]))
    if shares is None:  # 32 records over 4 processes leave no remainder.
      assert union == set(range(32))
  assert ip.share_lengths(SHARDS, process_count) == (
      [13, 19] if process_count == 2 else [8, 8, 8, 8])


def test_split_files_balances_by_length():
  assert ip.split_files([5, 1, 1, 4, 1], 2) == [(0, 2), (1, 3, 4)]
  assert ip.share_lengths([5, 1, 1, 4, 1], 2) == [6, 6]
  assert ip.split_files([3], 2) is None
  assert ip.share_lengths([3, 2], 3) == [2, 2, 1]


def test_divisibility_errors(data, mesh):
  with pytest.raises(ValueError, match="does not divide over the mesh's 8"):
    ip.train_stream(data.path, 12, mesh)
  with pytest.raises(ValueError, match='does not divide over 3 processes'):
    ip.train_stream(data.path, 8, mesh, process_index=0, process_count=3)
  with pytest.raises(ValueError, match='fewer than its batch'):
    ip.train_stream(data.path, 64, mesh)


def test_resume_across_epoch_boundary(data, mesh):
  want = _take(ip.train_stream(data.path, 8, mesh, seed=5), 10)
  it = ip.train_stream(data.path, 8, mesh, seed=5)
  _take(it, 4)
  state = json.loads(json.dumps(it.state()))
  assert state == {'epoch': 1, 'index': 0}
  got = _take(ip.train_stream(data.path, 8, mesh, seed=5, start=state), 6)
  # Mid-epoch too: after batch 5 (epoch 1, index 8), and as a step count.
  mid = _take(ip.train_stream(data.path, 8, mesh, seed=5,
                              start={'epoch': 1, 'index': 8}), 5)
  step = _take(ip.train_stream(data.path, 8, mesh, seed=5, start=6), 4)
  for got_, from_ in ((got, 4), (mid, 5), (step, 6)):
    for g, w in zip(got_, want[from_:]):
      assert g['image'].tobytes() == w['image'].tobytes()
      np.testing.assert_array_equal(g['label'], w['label'])


def test_resume_of_a_record_split_process(data, mesh):
  def stream(start=None):
    return ip.train_stream(data.path, 8, mesh, seed=7, start=start,
                           process_index=1, process_count=4)
  it = stream()
  want = [it.next_local() for _ in range(10)]
  it = stream()
  for _ in range(3):
    it.next_local()
  assert it.state() == {'epoch': 0, 'index': 6}
  resumed = stream(it.state())
  for w in want[3:]:
    g = resumed.next_local()
    assert g['image'].tobytes() == w['image'].tobytes()
  with pytest.raises(RuntimeError, match='next_local'):
    next(resumed)


def test_bad_start_is_refused(data, mesh):
  with pytest.raises(ValueError, match='multiple of the per-process batch'):
    ip.train_stream(data.path, 8, mesh, start={'epoch': 0, 'index': 3})
  with pytest.raises(ValueError, match="'epoch' and 'index'"):
    ip.train_stream(data.path, 8, mesh, start={'step': 3})


def test_ordered_dataset(data):
  batches = list(ip.ordered_dataset(data.path, batch_size=10)
                 .as_numpy_iterator())
  assert [len(b['label']) for b in batches] == [10, 10, 10, 2]
  images = np.concatenate([b['image'] for b in batches])
  assert [i for i, _ in data.identify(images)] == list(range(32))
  np.testing.assert_array_equal(
      np.concatenate([b['label'] for b in batches]), data.labels)


def test_the_input_contract_reaches_both_datasets(data, mesh):
  """A BGR, (x - 127.5) / 127.5 network (AdaFace's) gets its pixels so
  from the ordered and the training dataset: the same records, channels
  reversed, the other scale."""
  contract = images.InputContract('BGR', 127.5, 127.5)
  plain = next(ip.ordered_dataset(data.path, 8).as_numpy_iterator())
  bgr = next(ip.ordered_dataset(data.path, 8, contract=contract)
             .as_numpy_iterator())
  pixels = images.denormalize(plain['image'])
  np.testing.assert_allclose(bgr['image'],
                             (pixels[..., ::-1] - 127.5) / 127.5, atol=1e-5)
  np.testing.assert_allclose(images.denormalize(bgr['image'], contract),
                             pixels, atol=1e-3)
  a = ip.train_stream(data.path, 8, mesh, flip=False).next_local()
  b = ip.train_stream(data.path, 8, mesh, flip=False,
                      contract=contract).next_local()
  np.testing.assert_allclose(
      b['image'], images.normalize(images.denormalize(a['image']), contract),
      atol=1e-5)


def test_not_a_dataset(tmp_path, mesh):
  with pytest.raises(FileNotFoundError, match='python -m data_prep train'):
    ip.dataset_info(tmp_path)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    ip.train_stream(tmp_path / 'nowhere', 8, mesh)
  (tmp_path / 'dataset_info.json').write_text('{not json')
  (tmp_path / 'features.json').write_text('{}')
  with pytest.raises(ValueError, match='data_prep'):
    ip.dataset_info(tmp_path)


def test_orl_folder_through_data_prep_and_the_pipeline(tmp_path, mesh):
  """The real path: an ORL image folder (s1..s4) through ``python -m
  data_prep train``'s conversion into the stream, flips off: each epoch
  holds every image once, exactly the decode of its stored JPEG, labelled
  by its identity, and within JPEG error of the source resized."""
  src = orl_people(tmp_path, range(1, 5))
  orl = SHARED_DATA / 'orl_faces'
  from PIL import Image  # noqa: PLC0415
  from data_prep import train_set  # noqa: PLC0415
  out = tmp_path / 'out'
  report = train_set.convert(str(src), str(out), num_shards=2, workers=1,
                             progress=False)
  assert report['num_examples'] == 40 and report['num_classes'] == 4
  names = json.loads((out / 'label_map.json').read_text())
  assert names == ['s1', 's2', 's3', 's4']
  stored, stored_labels = [], []
  for record in tf.data.TFRecordDataset(ip.dataset_info(out).files):
    ex = tf.train.Example.FromString(record.numpy()).features.feature
    stored.append(ex['image'].bytes_list.value[0])
    stored_labels.append(ex['label'].int64_list.value[0])
  data = Data(out, stored, stored_labels, report['shard_lengths'])
  it = ip.train_stream(data.path, 8, mesh, flip=False)
  seen = []
  for b in _take(it, it.steps_per_epoch):
    found = data.identify(b['image'])
    assert not any(flipped for _, flipped in found)
    ids = [i for i, _ in found]
    np.testing.assert_array_equal(b['label'], data.labels[ids])
    seen += ids
  assert sorted(seen) == list(range(40))
  # Each stored image is its source face (the label's identity), resized.
  for decoded, label in zip(data.decoded, data.labels):
    person = orl / names[label]
    errors = [np.mean(np.abs(decoded.astype(float) - np.asarray(
        Image.open(person / f'{k}.pgm').convert('RGB').resize((SIZE, SIZE)),
        float))) for k in range(1, 11)]
    assert min(errors) < 4, errors


# --- Synthetic ---------------------------------------------------------------

def test_synthetic_is_deterministic_resumable_and_sharded(mesh):
  def stream(**kw):
    return synthetic.synthetic_stream(10, 16, mesh, image_size=32, seed=1, **kw)
  want = _take(stream(), 5)
  it = stream()
  _take(it, 2)
  assert it.state() == {'step': 2}
  got = _take(stream(start=it.state()), 3)
  for g, w in zip(got, want[2:]):
    assert g['image'].tobytes() == w['image'].tobytes()
    np.testing.assert_array_equal(g['label'], w['label'])
  batch = next(stream())
  assert batch['image'].shape == (16, 32, 32, 3)
  assert batch['image'].sharding.spec == P('data')
  assert batch['label'].dtype == jnp.int32
  assert np.all((np.asarray(batch['label']) >= 0)
                & (np.asarray(batch['label']) < 10))
  other = next(synthetic.synthetic_stream(10, 16, mesh, image_size=32, seed=2))
  assert not np.array_equal(np.asarray(other['image']), want[0]['image'])
  with pytest.raises(ValueError, match="does not divide over the mesh's 8"):
    synthetic.synthetic_stream(10, 12, mesh)


def test_synthetic_identities_are_separable():
  """Samples lie nearer their own prototype than any other, also for held-out
  classes, so that a network can learn and verification means something."""
  classes = list(range(100, 110))
  images, labels = synthetic.synthetic_examples(classes, 4, image_size=32,
                                                seed=0)
  assert images.shape == (40, 32, 32, 3) and labels.dtype == np.int32
  np.testing.assert_array_equal(labels, np.repeat(classes, 4))
  assert -1 <= images.min() and images.max() <= 1
  again, _ = synthetic.synthetic_examples(classes, 4, image_size=32, seed=0)
  np.testing.assert_array_equal(images, again)
  protos = (synthetic.prototypes(classes, 32, seed=0) - 127.5) / 128.0
  # Distance after the best shift of up to 4 pixels.
  dist = np.full((40, 10), np.inf)
  for dy in range(-4, 5):
    for dx in range(-4, 5):
      shifted = np.roll(protos, (dy, dx), axis=(1, 2))
      d = ((images[:, None] - shifted[None]) ** 2).mean(axis=(2, 3, 4))
      dist = np.minimum(dist, d)
  np.testing.assert_array_equal(np.array(classes)[dist.argmin(1)], labels)


def test_synthetic_needs_no_tensorflow():
  code = (
      'import sys, jax\n'
      'from npcface_jax import synthetic\n'
      "mesh = jax.make_mesh((1, 1), ('data', 'model'))\n"
      'b = next(synthetic.synthetic_stream(4, 2, mesh, image_size=16))\n'
      "assert b['image'].shape == (2, 16, 16, 3)\n"
      "assert 'tensorflow' not in sys.modules, 'TF was imported'\n")
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, cwd=pathlib.Path(__file__).parents[1],
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
