"""From raw photos to a fine-tuned model and its answers, on ORL, with the
commands a user types (benchmarks/finetune_orl.py, as the README's "Your
own photos" runs them): photos detected and aligned by data_prep, a run
trained on s1-s20, fine-tuned on s21-s30, verified on pairs of s31-s40 that
neither saw, and verify agreeing with evaluate on those pairs."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from npcface_jax.common import jsonfile
from npcface_jax.faces import alignment
from tests.helpers import orl_faces

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _workflow_module():
  spec = importlib.util.spec_from_file_location(
      'finetune_orl', ROOT / 'benchmarks' / 'finetune_orl.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow(minutes=5)
def test_photos_to_a_finetuned_model_and_its_answers(tmp_path):
  orl = orl_faces()  # ../shared/data, read in place, never copied
  # One data_prep worker: the other core runs the other pytest worker.
  result = _workflow_module().workflow(tmp_path, freeze=20,
                                       finetune_lr=0.01, scratch=False,
                                       workers=1, orl=orl)
  acc = result['accuracy']
  # Detection: a face in each of the 300 training photos, landmarks inside
  # the 92 x 112 photo, eyes above the nose above the mouth, left eye left.
  for name, count in (('set_a', 200), ('set_b', 100)):
    report = jsonfile.read_object(tmp_path / name / 'report.json')
    assert (report['num_examples'], report['num_skipped']) == (count, 0)
  points = alignment.read_landmarks(tmp_path / 'landmarks_a.txt')
  assert len(points) == 200
  p = np.array(list(points.values())).reshape(-1, 5, 2)
  assert (p >= 0).all() and (p[..., 0] < 92).all() and (p[..., 1] < 112).all()
  eyes, nose, mouth = p[:, :2, 1].max(1), p[:, 2, 1], p[:, 3:, 1].min(1)
  assert (eyes < nose).all() and (nose < mouth).all()
  assert (p[:, 0, 0] < p[:, 1, 0]).all()
  # A photo without a face MTCNN can find (one of ORL's 400, in the shared
  # folder) is skipped, named, as 'no face'.
  skipped = result['verified']['skipped']
  assert len(skipped) <= 1 and all(
      s['reason'].startswith('no face') and (orl / s['name']).is_file()
      for s in skipped), skipped
  # Training learns. The training set is learnt in every case measured:
  # over 11 variants (this recipe under XLA code generation changed as
  # other CPUs change it: AVX2, 512- and 128-bit vectors, LLVM -O0, fast
  # math, the native formulations; and 4 other seeds) the last logged
  # training accuracy was 0.974-0.995 and the loss fell from 24-26 to
  # 0.07-0.34 (benchmarks/RESULTS.md, "How far the ORL recipe moves").
  # What this small run verifies on 10 unseen people moves more: it is
  # chaotic (a 1e-7 change of the weights grows ~100-fold a step:
  # tests/test_backward_run.py), and the same variants ended at 82.9% to
  # 89.9%, +3.9 to +16.0 points over their start (512-bit vectors the
  # least); on the chunked loss (the default since issue 27, the same
  # steps to 1e-5 at first) the same recipe ended at 81.45%, +0.68 points,
  # and at 86.01% with the full logits (benchmarks/RESULTS.md, "Every head
  # on ORL"). So the test asks for the training set learnt, and for the
  # unseen pairs no more than it can: at least 80%, and not 2 points below
  # the untrained network.
  records = [json.loads(line) for line in (
      tmp_path / 'run_a' / 'analysis' / 'metrics.jsonl').read_text(
      ).splitlines()]
  assert records[-1]['accuracy'] >= 0.9, records[-1]
  assert records[-1]['loss'] <= records[0]['loss'] / 10, records
  assert acc['run_a'] >= acc['run_a at step 0'] - 0.02, acc
  assert acc['run_a'] >= 0.8, acc
  # Fine-tuning on ten other people keeps the backbone's verification of a
  # third group within a few points (measured 91.2 -> 89.7; it does not
  # raise it: see benchmarks/RESULTS.md), and its first verification,
  # before any step, is the start's: the backbone came over unchanged.
  assert acc['run_b at step 0'] == acc['run_a'], acc
  assert acc['run_b'] >= acc['run_a'] - 0.04, acc
  # verify at evaluate's 10-fold threshold agrees with evaluate's 10-fold
  # accuracy on the same pairs (the photos aligned afresh, not the .bin's
  # JPEGs), and scores the same pairs.
  assert abs(acc['run_b verify'] - acc['run_b evaluate']) <= 0.02
  assert len(result['verified']['pairs']) == result['evaluated'][
      'num_pairs']
