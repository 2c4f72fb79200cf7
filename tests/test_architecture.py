"""The structure docs/architecture.md states, checked from the source with
ast: every module is in its module map, imports only modules listed before
it (so there is no import cycle and nothing imports upwards), npcface_jax
never imports data_prep, evaluation never imports the training loop; no
function in npcface_jax/ is over 60 lines; nothing points at files outside
the repository."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ('npcface_jax', 'data_prep')
MAX_FUNCTION_LINES = 60


def _module_map() -> list[str]:
  """The modules of docs/architecture.md's map, in its order."""
  text = (ROOT / 'docs' / 'architecture.md').read_text()
  return re.findall(r'^\| `((?:npcface_jax|data_prep)/[\w/]+\.py)` \|', text,
                    re.MULTILINE)


def _source_modules() -> list[str]:
  return sorted(str(p.relative_to(ROOT)) for package in PACKAGES
                for p in (ROOT / package).rglob('*.py'))


def _file_of(dotted: str) -> str | None:
  """'npcface_jax.models.layers' -> 'npcface_jax/models/layers.py' (or the
  package's __init__.py); None when it is not a module of ours."""
  path = ROOT / dotted.replace('.', '/')
  if path.with_suffix('.py').is_file():
    return str(path.with_suffix('.py').relative_to(ROOT))
  if (path / '__init__.py').is_file():
    return str((path / '__init__.py').relative_to(ROOT))
  return None


def _imports(module: str) -> set[str]:
  """The files of ours that ``module`` imports anywhere in it (functions
  included); ``from pkg import name`` counts as pkg/name.py when that is a
  module, else as pkg itself."""
  tree = ast.parse((ROOT / module).read_text())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f'{node.module}.{a.name}' for a in node.names]
      names = [n if _file_of(n) else node.module for n in names]
    else:
      continue
    found.update(f for n in names
                 if n.split('.')[0] in PACKAGES and (f := _file_of(n)))
  found.discard(module)
  return found


def test_every_module_is_in_the_map_once():
  listed = _module_map()
  assert len(listed) == len(set(listed)), 'a module is listed twice'
  assert sorted(listed) == _source_modules(), (
      'docs/architecture.md and the source disagree: missing from the map '
      f'{sorted(set(_source_modules()) - set(listed))}, not in the source '
      f'{sorted(set(listed) - set(_source_modules()))}')


@pytest.mark.parametrize('module', _module_map())
def test_imports_go_down_the_map(module):
  """A module imports only modules listed before it (its own layer's
  earlier rows or lower layers): no cycle, nothing upwards."""
  order = {m: i for i, m in enumerate(_module_map())}
  upwards = sorted(m for m in _imports(module)
                   if order.get(m, len(order)) >= order[module])
  assert not upwards, f'{module} imports {upwards}, listed after it'


def test_npcface_jax_never_imports_data_prep():
  offenders = {m: sorted(i for i in _imports(m) if i.startswith('data_prep'))
               for m in _source_modules() if m.startswith('npcface_jax/')}
  assert not {m: i for m, i in offenders.items() if i}


def test_evaluation_never_imports_the_training_loop():
  loop = {'npcface_jax/train.py', 'npcface_jax/train_step.py',
          'npcface_jax/main.py'}
  for module in ('npcface_jax/evaluate.py', 'npcface_jax/verification.py',
                 'npcface_jax/embedding.py', 'npcface_jax/run_dir.py'):
    assert not _imports(module) & loop, module


def test_no_function_over_60_lines():
  long = []
  for module in _source_modules():
    if not module.startswith('npcface_jax/'):
      continue
    for node in ast.walk(ast.parse((ROOT / module).read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_FUNCTION_LINES:
          long.append(f'{module}:{node.lineno} {node.name} ({lines} lines)')
  assert not long, long


def test_nothing_points_outside_the_repository():
  outside = 'DESIGN' + '.md'  # a background file that is not in the repo
  files = [p for pattern in ('**/*.py', '**/*.md', '**/*.cfg', '**/*.sh')
           for p in ROOT.glob(pattern)
           if '.git' not in p.parts and 'build' not in p.parts]
  assert not [str(p.relative_to(ROOT)) for p in files
              if outside in p.read_text(errors='replace')]
