"""npcface_jax.faces.images, the one image layer: normalize, read_image on files
and bytes, the listing of image and identity folders, and the batch
loader's rule for bad images (left out of the batches, reported with their
index, order kept)."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from npcface_jax.faces import alignment, images


def test_normalize_values():
  pixels = np.array([0, 127.5, 128, 255], np.float32)
  want = [-127.5 / 128, 0, 0.5 / 128, 127.5 / 128]
  np.testing.assert_allclose(images.normalize(pixels), want, rtol=1e-7)
  assert images.normalize(pixels).dtype == np.float32
  got = images.normalize(jnp.asarray([0, 255], jnp.uint8).astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(got), [-127.5 / 128, 127.5 / 128])


def _png(path, value, size=(30, 20)):
  Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
  return str(path)


def test_batches_keep_order_and_skip_bad_files(tmp_path):
  """(Was test_evaluate's test of read_images.)"""
  paths = []
  for i in range(11):
    paths.append(_png(tmp_path / f'{i}.png', i))
  (tmp_path / '4.png').write_bytes(b'not a png')
  paths.append(str(tmp_path / 'missing.png'))
  loader = images.ImageBatches(paths, 8, 3)
  batches = list(loader)
  skipped = loader.skipped
  assert [b.shape for b in batches] == [(3, 8, 8, 3), (2, 8, 8, 3),
                                        (3, 8, 8, 3), (2, 8, 8, 3)]
  assert np.concatenate(batches)[:, 0, 0, 0].tolist() == [
      0, 1, 2, 3, 5, 6, 7, 8, 9, 10]
  assert [(i, os.path.basename(p)) for i, p, _ in skipped] == [
      (4, '4.png'), (11, 'missing.png')]
  assert skipped[0][2].startswith('not an image')
  # (Was 'unreadable': evaluate's own reader said so for any OSError.)
  assert skipped[1][2].startswith('missing file')
  assert images.image_files(str(tmp_path)) == sorted(
      paths[:-1], key=lambda p: os.path.basename(p))


@pytest.mark.parametrize('workers', [0, 2])
def test_a_corrupt_file_among_good_ones(tmp_path, workers):
  """Batches hold only the good images, in order; the skipped list names
  the bad one with its index; kept maps rows back to sources; a window of
  bad files only is an empty batch, so len() is exact."""
  paths = [_png(tmp_path / f'{i}.png', 10 * i) for i in range(7)]
  (tmp_path / '2.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 40)
  for i in (4, 5):
    (tmp_path / f'{i}.png').write_bytes(b'')
  loader = images.ImageBatches(paths, 4, 2, workers=workers)
  for _ in range(2):  # each pass starts afresh
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    assert [len(b) for b in batches] == [2, 1, 0, 1]
    assert all(b.shape[1:] == (4, 4, 3) and b.dtype == np.uint8
               for b in batches)
    assert np.concatenate(batches)[:, 0, 0, 0].tolist() == [0, 10, 30, 60]
    assert loader.kept == [0, 1, 3, 6]
    assert [(s.index, s.name) for s in loader.skipped] == [
        (2, paths[2]), (4, paths[4]), (5, paths[5])]
    assert loader.skipped[0].reason.startswith('corrupt image: PNG')
    assert loader.skipped[1].reason.startswith('empty')


def test_batches_of_bytes_under_a_root_and_with_landmarks(tmp_path):
  face = np.random.default_rng(0).integers(0, 256, (60, 50, 3), np.uint8)
  Image.fromarray(face).save(tmp_path / 'a.png')
  data = (tmp_path / 'a.png').read_bytes()
  by_bytes = images.ImageBatches([data, b'junk'], 16, 8)
  assert [b.shape for b in by_bytes] == [(1, 16, 16, 3)]
  assert by_bytes.skipped == [images.Skipped(1, 'image 1', by_bytes.skipped[
      0].reason)] and by_bytes.skipped[0].reason.startswith('not an image')
  points = alignment.template(40) + 3
  flat = [[0.0] * 10]
  aligned = images.ImageBatches(['a.png', 'a.png'], 16, 8, root=tmp_path,
                                landmarks=[points, flat])
  (batch,) = list(aligned)
  want = alignment.align(Image.fromarray(face), points, 16)
  np.testing.assert_array_equal(batch, [np.asarray(want)])
  assert aligned.skipped[0][:2] == (1, 'a.png')
  assert aligned.skipped[0].reason.startswith('bad landmarks: ')
  with pytest.raises(ValueError, match='2 images but 1 landmarks'):
    images.ImageBatches(['a', 'b'], 16, 8, landmarks=[points])


def test_read_image_raises_only_bad_image(tmp_path):
  good = _png(tmp_path / 'g.png', 7)
  from_path = images.read_image(good, 8)
  assert from_path.shape == (8, 8, 3) and from_path.dtype == np.uint8
  with open(good, 'rb') as f:
    data = f.read()
  np.testing.assert_array_equal(images.read_image(data, 8), from_path)
  os.mkfifo(tmp_path / 'fifo.png')
  for source, reason in ((tmp_path / 'no.png', 'missing file'),
                         (tmp_path, 'unreadable file'),
                         (tmp_path / 'fifo.png', 'unreadable file'),
                         (f'{tmp_path}/a\0b.png', 'unreadable file'),
                         (b'', 'empty')):
    with pytest.raises(images.BadImage) as e:
      images.read_image(source, 8)
    assert e.value.reason == reason and e.value.detail, (source, e.value)
    assert str(e.value).startswith(reason + ': ')


def test_identity_files(tmp_path):
  for person in ('bob', 'ann', '.hidden', 'bad\nname'):
    (tmp_path / person / 'deep').mkdir(parents=True)
    _png(tmp_path / person / '1.png', 1)
    _png(tmp_path / person / 'deep' / '2.jpg', 2)
  (tmp_path / 'ann' / '.3.png').write_bytes(b'hidden')
  (tmp_path / 'ann' / 'notes.txt').write_text('not an image file')
  (tmp_path / 'ann' / 'deep' / 'up').symlink_to('..')  # walked once
  _png(tmp_path / 'root.png', 0)  # in no identity folder
  files, skipped = images.identity_files(tmp_path)
  assert [(os.path.relpath(p, tmp_path), who) for p, who in files] == [
      ('ann/1.png', 'ann'), ('ann/deep/2.jpg', 'ann'),
      ('bob/1.png', 'bob'), ('bob/deep/2.jpg', 'bob')]
  assert [k for k, _ in skipped] == ['bad\nname/1.png', 'bad\nname/deep/2.jpg']
  assert all(r.startswith('bad identity name: ') for _, r in skipped)
  with pytest.raises(ValueError, match='has no identity folders'):
    images.identity_files(tmp_path / 'bob' / 'deep')
