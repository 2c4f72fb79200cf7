"""The model card an export carries (model_card.json, and the same facts as
model_card.md for people): what the network is, what it expects and
returns, what it was trained on, how it scored, how closely every
exported format reproduces it, and the sha256 of every file, so that a
model found on a disk months later still says how to use it and whether
it is intact (``export --check``)."""

from __future__ import annotations

import hashlib
import os
import time

import jax
import numpy as np

from npcface_jax.common import jsonfile
from npcface_jax.data import input_pipeline
from npcface_jax.faces import alignment, images
from npcface_jax.serving import run_dir

CARD_JSON, CARD_MD = 'model_card.json', 'model_card.md'
CARDS = (CARD_JSON, CARD_MD)  # not hashed: the json holds the hashes
MIN_COSINE = 0.9999  # each format against the JAX embedder, float32
ACCURACY_POINTS = 0.1  # verification accuracy, exported against JAX
NORM_RTOL = 1e-3  # the norm output (--with_norm), relative, against JAX


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def export_files(root: str) -> list[str]:
  """Every file under root but the cards, as sorted '/'-separated paths."""
  found = []
  for folder, dirs, files in os.walk(root):
    dirs.sort()
    for name in files:
      rel = os.path.relpath(os.path.join(folder, name), root)
      if rel not in CARDS:
        found.append(rel.replace(os.sep, '/'))
  return sorted(found)


def file_records(root: str) -> dict[str, dict]:
  return {rel: {'sha256': sha256(os.path.join(root, rel)),
                'bytes': os.path.getsize(os.path.join(root, rel))}
          for rel in export_files(root)}


def _training(config, num_classes: int, step: int) -> dict:
  """Data, head and schedule as trained; the image count from data_prep's
  metadata when the data is still where training read it."""
  source, note = config.dataset, ''
  count, steps_per_epoch = None, None
  if source == 'synthetic':
    count = int(config.synthetic.epoch_examples)
    source, note = 'synthetic identities (config.synthetic)', 'an epoch'
  else:
    try:
      count = input_pipeline.dataset_info(source).num_examples
    except (OSError, ValueError):
      pass  # moved or deleted since training: the card says unknown
  if count:
    steps_per_epoch = max(count // config.batch_size, 1)
  return {'dataset': source, 'classes': num_classes, 'images': count,
          'images_note': note,
          'batch_size': config.batch_size, 'head': config.head,
          'steps': step,
          'epochs': round(step / steps_per_epoch, 2) if steps_per_epoch
          else None}


def _evaluation(workdir: str, step: int, flip: bool) -> dict | None:
  """The run's evaluation results at this step (with flip as exported if
  both exist), reduced to the numbers a user needs."""
  for f in (flip, not flip):
    rel = os.path.join('eval', f'step_{step}' + '_flip' * f, 'results.json')
    path = os.path.join(workdir, rel)
    if os.path.exists(path):
      break
  else:
    return None
  record = jsonfile.read_object(path)
  sets = {}
  for name, result in (record.get('targets') or {}).items():
    if not isinstance(result, dict):
      continue
    kept = {k: v for k, v in result.items()
            if isinstance(v, (int, float, str, bool)) and k != 'roc'}
    if isinstance(result.get('tar_at_far'), list):
      kept['tar_at_far'] = result['tar_at_far']
    sets[name] = kept
  return {'source': rel.replace(os.sep, '/'), 'flip': bool(
      record.get('flip')), 'sets': sets}


def describe(model, flip: bool, with_norm: bool = False) -> dict:
  """The card without parity and files: model is an inference.Model;
  with_norm: the files also return 'norm' (card['norm_output'])."""
  size, config = model.image_size, model.config
  contract = images.input_contract(config)
  info = jsonfile.read_object(os.path.join(model.workdir, run_dir.RUN_INFO))
  params = model.variables['params']
  dim = int(config.embedding_dim)
  return {
      'card_version': 1,
      'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
      'run': {'workdir': os.path.abspath(model.workdir), 'step': model.step},
      'model': {'backbone': config.model,
                'options': dict(config.model_options),
                'parameters': int(sum(np.size(p) for p in
                                      jax.tree.leaves(params))),
                'embedding_size': dim},
      'input': {'name': 'images', 'dtype': 'uint8', 'channels': 'RGB',
                'shape': ['batch', size, size, 3],
                'alignment': 'each face aligned by a similarity transform '
                             'of its 5 landmarks (eyes, nose tip, mouth '
                             'corners) onto the template',
                'template': np.round(alignment.template(size), 4).tolist(),
                'normalisation': 'inside the graph: ' + (
                    'channels reordered to BGR, then ' if
                    contract.channels == 'BGR' else '') + (
                    f'(x - {contract.center:g}) / {contract.scale:g}'),
                'flip': flip},
      'output': {'name': 'embeddings', 'dtype': 'float32',
                 'shape': ['batch', dim],
                 'normalised': 'L2 (unit length): the dot product of two is '
                               'their cosine similarity'},
      'norm_output': None if not with_norm else {
          'name': 'norm', 'dtype': 'float32', 'shape': ['batch'],
          'meaning': 'each face\'s raw embedding norm, the backbone\'s '
                     'output before L2 normalising' + (
                         ' (the mean of the face\'s and its mirror '
                         'image\'s)' if flip else '') + ': a face-quality '
                     'score (low: a poor face) only for heads that train '
                     'it, MagFace and AdaFace; '
                     f'within {NORM_RTOL:g} (relative) of the JAX '
                     'embedder\'s in every format'},
      'training': _training(config, info.get('num_classes'), model.step),
      'head_options': info.get('head_options'),
      'evaluation': _evaluation(model.workdir, model.step, flip),
      'imported': info.get(run_dir.IMPORTED),  # None: trained here
  }


def write(root: str, card: dict) -> None:
  jsonfile.write_object(os.path.join(root, CARD_JSON), card)
  with open(os.path.join(root, CARD_MD), 'w', encoding='utf-8') as f:
    f.write(markdown(card))


# --- The same facts for people ------------------------------------------------

def _evaluation_lines(evaluation: dict | None) -> list[str]:
  if not evaluation:
    return ['No evaluation results at this step: run python -m '
            'npcface_jax.evaluate on the run, then export again.']
  lines = [f'From `{evaluation["source"]}` (flip: {evaluation["flip"]}).',
           '', '| set | accuracy | threshold | TAR at FAR (threshold) |',
           '|---|---|---|---|']
  for name, r in sorted(evaluation['sets'].items()):
    accuracy = (f'{100 * r["accuracy"]:.2f}% +- '
                f'{100 * r.get("accuracy_std", 0):.2f}'
                if 'accuracy' in r else '-')
    threshold = f'{r["threshold"]:.4f}' if 'threshold' in r else '-'
    tars = ', '.join(f'{100 * t["tar"]:.2f}% at {t["far"]:g} '
                     f'({t["threshold"]:.4f})'
                     for t in r.get('tar_at_far', []) if 'threshold' in t)
    lines.append(f'| {name} | {accuracy} | {threshold} | {tars or "-"} |')
  return lines


def _parity_lines(parity: dict) -> list[str]:
  lines = [f'**{"PASSED" if parity["passed"] else "FAILED"}**: every '
           f'format against the JAX embedder on {parity["images"]} faces '
           f'({parity["faces"]}), in batches of '
           f'{", ".join(map(str, parity["batches"]))}; required minimum '
           f'cosine {parity["min_cosine_required"]}, accuracy within '
           f'{parity["accuracy_points"]} point.', '',
           '| format | min cosine | mean cosine | verification accuracy, '
           'export vs JAX | images/s (this check, compile included) |',
           '|---|---|---|---|---|']
  for fmt, r in parity['formats'].items():
    if 'error' in r:
      lines.append(f'| {fmt} | failed: {r["error"]} | | | |')
      continue
    acc = '; '.join(f'{name} {100 * a["export"]:.2f}% vs '
                    f'{100 * a["jax"]:.2f}%'
                    for name, a in r['accuracy'].items()) or '-'
    norm = (f' (norm within {r["max_norm_error"]:.2g})'
            if 'max_norm_error' in r else '')
    lines.append(f'| {fmt} | {r["min_cosine"]:.7f}{norm} | '
                 f'{r["mean_cosine"]:.7f} | {acc} | '
                 f'{r["images_per_second"]:.1f} |')
  return lines


def _origin_lines(record: dict) -> list[str]:
  """An imported model: where it came from, its licence as the user
  stated it, and how its import was checked."""
  parity = record.get('parity') or {}
  return ['## Origin', '',
          f'- Trained elsewhere: {record.get("made_by")}, imported from '
          f'`{record.get("source")}` ({record.get("format")}, sha256 '
          f'`{record.get("sha256")}`).',
          f'- Licence, as stated at import: {record.get("license")}. '
          'Released face models are mostly for non-commercial research: '
          'the licence, not this card, says what you may do with it.',
          f'- Import checked against {parity.get("against")}: minimum '
          f'cosine {parity.get("min_cosine")} on {parity.get("faces")}.',
          '']


def markdown(card: dict) -> str:
  m, i, t = card['model'], card['input'], card['training']
  template = '; '.join(f'({x:g}, {y:g})' for x, y in i['template'])
  lines = [
      f'# Model card: {m["backbone"]}, step {card["run"]["step"]}', '',
      f'Exported {card["created"]} from `{card["run"]["workdir"]}`.', '',
      '## The model', '',
      f'- Backbone: {m["backbone"]} {m["options"] or ""}, '
      f'{m["parameters"]:,} parameters, embedding size '
      f'{m["embedding_size"]}.',
      f'- Input `{i["name"]}`: {i["dtype"]} {i["channels"]}, shape '
      f'{i["shape"]}, any batch; {i["alignment"]}, (x, y) in a '
      f'{i["shape"][1]}x{i["shape"][2]} crop: {template}. Normalisation '
      f'is {i["normalisation"]}: feed raw pixels.',
      f'- Output `{card["output"]["name"]}`: float32 {card["output"]["shape"]}'
      f', {card["output"]["normalised"]}.'
      + (' Each face\'s mirror image is added (flip test-time '
         'augmentation).' if i['flip'] else ''),
      *([f'- Output `{card["norm_output"]["name"]}`: float32 '
         f'{card["norm_output"]["shape"]}, '
         f'{card["norm_output"]["meaning"]}.']
        if card.get('norm_output') else []), '',
      *(_origin_lines(card['imported']) if card.get('imported') else [
          '## Training', '',
          f'- Data: {t["dataset"]}; {t["classes"]} classes, '
          f'{t["images"] or "an unknown number of"} images '
          f'{t.get("images_note", "")}'.rstrip() + '.',
          f'- Head: {t["head"]} {card["head_options"] or ""}.',
          f'- {t["steps"]} steps of batch {t["batch_size"]}'
          + (f' ({t["epochs"]} epochs).' if t['epochs'] else '.'), '']),
      '## Evaluation', '', *_evaluation_lines(card['evaluation']), '',
      '## Parity of the exported files', '', *_parity_lines(card['parity']),
      '', '## Files', '', '| file | bytes | sha256 |', '|---|---|---|',
      *[f'| `{name}` | {r["bytes"]} | `{r["sha256"]}` |'
        for name, r in card['files'].items()], '',
      'Check them with `python -m npcface_jax.export --check=<this folder>`.',
      '', '## Versions', '',
      ', '.join(f'{k} {v}' for k, v in card['versions'].items()), '']
  return '\n'.join(lines)
