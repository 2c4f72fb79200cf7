"""``python -m npcface_jax.report RUN [RUN ...] --out=DIR``: several runs
compared as the paper does, in one report.md with its figures (PNG, the
[report] extra) and the results table (table.csv too):

- the training loss and accuracy of every run on one axis (Fig. 8);
- each run's head's own diagnostics over training (what it logs under
  '<head>/' and 'head/', in words: comparison.DIAGNOSTIC_LABELS), and the
  distribution of the embeddings' norms in each run's last hard-sample
  record (MagFace's Fig. 2; the quality score of MagFace and AdaFace);
- the hard-sample statistics recorded while training (hard_samples.py):
  Pearson's r of the mis-classified samples' angles (Fig. 3), the overlap
  rate of the mis- and well-classified cosine distributions (Fig. 6),
  those distributions per run (Fig. 5), the nearest other centre (Fig. 7);
- the ROC of every run on each evaluation set they share (Fig. 10);
- Tables I-IV: a row per run, labelled by what its config does
  differently, a column per set and measure, the best in bold
  (comparison.py).
Reads only files (run.json, analysis/*.jsonl, eval/results.json): no
JAX, no checkpoint; what a run lacks is said in the report.
"""

from __future__ import annotations

import glob
import os
import re
import time

from npcface_jax.common import jsonfile
from npcface_jax.study import comparison, figures

_DEFINITIONS = (
    'A training sample is *mis-classified* when some other class\'s cosine '
    'is above cos(theta_y + m) (m = {margins}, MV-softmax\'s hard sample and '
    'NPCFace\'s mask); each record covers every sample of the training '
    'batches since the one before. Distances are angles in degrees. The '
    'overlap rate is sum_b min(p_b, q_b) of the two cosine histograms, each '
    'normalised to 1.')


_MANY_RUNS = 6  # more: Fig. 5 shows fewer records per run


def _file_name(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.=-]+', '_', text).strip('_')[:80] or 'run'


def _hard_sample_figures(out: str, runs, names) -> list[str]:
  """Figs. 3, 6, 5 (one per run) and 7, as Markdown lines."""
  with_stats = [(label, run.stats) for label, run in zip(names, runs)
                if run.stats]
  if not with_stats:
    return ['No run recorded hard-sample statistics '
            '(config.analysis_every_steps = 0, or trained before them).', '']
  margins = sorted({r['margin'] for _, stats in with_stats for r in stats})
  lines = [_DEFINITIONS.format(margins=', '.join(f'{m:g}' for m in margins)),
           '']
  figures.correlation(os.path.join(out, 'fig3_correlation.png'), with_stats)
  figures.overlap(os.path.join(out, 'fig6_overlap.png'), with_stats)
  lines += [*_last_records(with_stats),
            '### Angles of the mis-classified samples (Fig. 3)', '',
            '![Fig. 3](fig3_correlation.png)', '',
            '### Overlap of mis- and well-classified samples (Fig. 6)', '',
            '![Fig. 6](fig6_overlap.png)', '',
            '### Cosine to the ground-truth centre (Fig. 5)', '']
  # Many runs: three records each (first, middle, last), one row of panels.
  panels = 6 if len(with_stats) <= _MANY_RUNS else 3
  for k, (label, stats) in enumerate(with_stats):
    name = f'fig5_cosines_{k}_{_file_name(label)}.png'
    figures.cosine_histograms(os.path.join(out, name), label, stats, panels)
    lines += [f'![Fig. 5, {label}]({name})', '']
  figures.nearest_negative(os.path.join(out, 'fig7_nearest.png'),
                           [(label, stats[-1]) for label, stats in with_stats])
  return lines + ['### Mis-classified samples\' nearest other centre '
                  '(Fig. 7, the last record of each run)', '',
                  '![Fig. 7](fig7_nearest.png)', '']


def _last_records(with_stats) -> list[str]:
  """The numbers of each run's last record, as a Markdown table."""
  pct = lambda x: '-' if x is None else f'{100 * x:.1f}'  # noqa: E731
  num = lambda x: '-' if x is None else f'{x:.3f}'  # noqa: E731
  lines = ['| label | epoch | samples | mis-classified (%) | r (Fig. 3) | '
           'overlap (Fig. 6) | mean norm |',
           '|---|---:|---:|---:|---:|---:|---:|']
  for label, stats in with_stats:
    r = stats[-1]
    lines.append(f"| {comparison.cell(label)} | {r['epoch']:.2f} | "
                 f"{r.get('samples')} "
                 f"| {pct(r.get('misclassified_share'))} | "
                 f"{num(r.get('pearson'))} | {num(r.get('overlap'))} | "
                 f"{num(r.get('mean_norm'))} |")
  return ['The last record of each run:', '', *lines, '']


def _head_figures(out: str, runs, names) -> list[str]:
  """A figure of each run's head's own diagnostics, and the feature norm
  distribution of every run's last hard-sample record, as Markdown
  lines."""
  lines, quiet, no_curve = [], [], []
  for k, (label, run) in enumerate(zip(names, runs)):
    keys = comparison.diagnostic_keys(run)
    if not keys:
      (quiet if run.metrics else no_curve).append(label)
      continue
    panels = [(comparison.diagnostic_label(key), key, band)
              for key, band in comparison.diagnostic_panels(keys)]
    name = f'fig11_head_{k}_{_file_name(label)}.png'
    figures.head_diagnostics(os.path.join(out, name), label, run.metrics,
                             panels, index=k)
    lines += [f'![Head diagnostics, {label}]({name})', '']
  if quiet:
    listed = ', '.join(map(comparison.cell, quiet))
    lines += [f'The head of {listed} logs no diagnostics of its own.'
              if len(quiet) == 1 else
              f'The heads of {listed} log no diagnostics of their own.', '']
  if no_curve:
    lines += [f"No training curve: {', '.join(map(comparison.cell, no_curve))}"
              ' (analysis/metrics.jsonl missing or empty).', '']
  lines = ['What each head logs of itself while training, against step '
           '(per-step means over the batch; a band is +- the logged std).',
           '', *lines, '### Feature norm distribution', '']
  last = [(label, run.stats[-1] if run.stats else None)
          for label, run in zip(names, runs)]
  if not any('norm_hist' in (record or {}) for _, record in last):
    return lines + ['No run recorded the embeddings\' norms (no hard-sample '
                    'records, or written before norms were recorded).', '']
  figures.norm_histograms(os.path.join(out, 'fig12_norms.png'), last)
  return lines + [
      'The norm ||x|| of the embeddings (before normalisation) of the '
      'training samples in each run\'s last record, on log-spaced bins: '
      'a quality score for the heads whose margin follows it, shown for '
      'every head; the dashed lines are the mean norm of the well- and the '
      'mis-classified samples. A run without norms is left out.', '',
      '![Feature norm distribution](fig12_norms.png)', '']


def _roc_figures(out: str, runs, names) -> list[str]:
  """Fig. 10: one picture per evaluation set every run has a ROC of."""
  curves = [comparison.roc_curves(run) for run in runs]
  shared = sorted(set.intersection(*(set(c) for c in curves)))
  if not shared:
    return ['No evaluation set with a stored ROC is shared by every run '
            '(evaluate each run on the same sets; results.json written '
            'before ROC points were stored holds none).', '']
  lines = []
  for name in shared:
    file = f'fig10_roc_{_file_name(name)}.png'
    figures.roc(os.path.join(out, file), name, [
        (label, *c[name]) for label, c in zip(names, curves)])
    lines += [f'![ROC on {name}]({file})', '']
  return lines


def _runs_table(runs, names) -> list[str]:
  lines = ['| run | label | workdir | head | backbone | trained steps |',
           '|---|---|---|---|---|---:|']
  for label, run in zip(names, runs):
    steps = run.metrics[-1]['step'] if run.metrics else '-'
    cells = [run.name, label, f'`{run.workdir}`', run.setup.get('head', '-'),
             run.setup.get('model', '-'), steps]
    lines.append('| ' + ' | '.join(map(comparison.cell, cells)) + ' |')
  return lines + ['']


def write_report(workdirs: list[str], out: str, title: str | None = None
                 ) -> str:
  """Writes out/report.md, out/table.csv and the figures; returns the
  report's path."""
  figures.require()
  if not workdirs:
    raise ValueError('name at least one run (a --workdir that '
                     'python -m npcface_jax.main trained in)')
  runs = [comparison.load_run(w) for w in workdirs]
  names = comparison.labels(runs)
  os.makedirs(out, exist_ok=True)
  for old in glob.glob(os.path.join(out, 'fig[0-9]*_*.png')):
    os.remove(old)  # an earlier report's figures (of other runs, maybe)
  results = comparison.table(runs)
  jsonfile.atomic_write(os.path.join(out, 'table.csv'),
                        comparison.csv_text(results).encode())
  figures.training_curves(os.path.join(out, 'fig8_training.png'),
                          [(n, r.metrics) for n, r in zip(names, runs)
                           if r.metrics])
  lines = [f'# {title or f"{len(runs)} runs compared"}', '',
           f'Written by `python -m npcface_jax.report` on '
           f'{time.strftime("%Y-%m-%d %H:%M")}.', '', '## Runs', '',
           *_runs_table(runs, names), '## Results (as Tables I-IV)', '',
           'Percent; the best of each column in **bold**; the same numbers '
           'as fractions in [table.csv](table.csv).', '',
           comparison.markdown(results), '## Training (Fig. 8)', '',
           '![Fig. 8](fig8_training.png)', '', '## Head diagnostics', '',
           *_head_figures(out, runs, names), '## Hard samples', '',
           *_hard_sample_figures(out, runs, names),
           '## ROC (Fig. 10)', '', *_roc_figures(out, runs, names)]
  notes = [f'- {run.name}: {note}' for run in runs for note in run.notes]
  if notes:
    lines += ['## Left out', '', *notes, '']
  path = os.path.join(out, 'report.md')
  jsonfile.atomic_write(path, '\n'.join(lines).encode())
  return path


def main(argv) -> None:
  from absl import app, flags  # noqa: PLC0415 (the command line only)
  try:
    path = write_report(argv[1:], flags.FLAGS.out, flags.FLAGS.title)
  except (ValueError, FileNotFoundError, figures.MissingExtra) as e:
    raise app.UsageError(str(e)) from None
  print('report:', path)


def _define_flags() -> None:
  from absl import flags  # noqa: PLC0415 (the command line only)
  flags.DEFINE_string('out', None, 'The folder for report.md, table.csv and '
                      'the figures.')
  flags.DEFINE_string('title', None, 'The report\'s title.')
  flags.mark_flags_as_required(['out'])


if __name__ == '__main__':
  from absl import app
  _define_flags()
  app.run(main)
