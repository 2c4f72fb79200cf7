"""The structure docs/architecture.md states, checked from the source with
ast: the package's top level holds only the API and the commands; every
library module sits in a role folder of the folder table and in its module
map; a module imports only folders its folder may import and, inside its
own folder, only modules listed before it (so there is no import cycle,
nothing upwards or sideways); no library imports a command; evaluation and
serving never import training; npcface_jax never imports data_prep; no
function in npcface_jax/ is over 60 lines; nothing points at files outside
the repository."""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = (ROOT / 'docs' / 'architecture.md').read_text()
PACKAGES = ('npcface_jax', 'data_prep')
MAX_FUNCTION_LINES = 60


def _folders() -> dict[str, set[str]]:
  """Folder -> the folders it may import, from the doc's folder table, in
  the table's order ('(top level)' is the commands, 'data_prep' its own)."""
  rows = re.findall(r'^\| `([\w/().\s]+)` \| [^|]+ \| ([^|]*) \|$', DOC,
                    re.MULTILINE)
  table = {}
  for folder, allowed in rows:
    names = [a.strip(' `/') for a in allowed.split(',') if a.strip(' `/-')]
    table[folder.strip('/')] = {
        n if n.startswith('npcface_jax') else f'npcface_jax/{n}'
        for n in names}
  return table


def _module_map() -> list[str]:
  """The modules of docs/architecture.md's map, in its order."""
  return re.findall(r'^\| `((?:npcface_jax|data_prep)/[\w/]+\.py)` \|', DOC,
                    re.MULTILINE)


def _source_modules() -> list[str]:
  return sorted(str(p.relative_to(ROOT)) for package in PACKAGES
                for p in (ROOT / package).rglob('*.py'))


def _folder_of(module: str) -> str:
  """'npcface_jax/loss/heads.py' -> 'npcface_jax/loss'; a module at the
  package's top level -> 'npcface_jax (top level)'."""
  parts = module.split('/')
  if parts[0] == 'data_prep':
    return 'data_prep'
  if len(parts) == 2:
    return 'npcface_jax (top level)'
  return '/'.join(parts[:2])


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


def _is_package_init(module: str) -> bool:
  return module.endswith('/__init__.py') and module.count('/') == 2


def test_every_module_is_in_the_map_once():
  listed = _module_map()
  assert len(listed) == len(set(listed)), 'a module is listed twice'
  assert sorted(listed) == _source_modules(), (
      'docs/architecture.md and the source disagree: missing from the map '
      f'{sorted(set(_source_modules()) - set(listed))}, not in the source '
      f'{sorted(set(listed) - set(_source_modules()))}')


def test_folders_are_the_table_and_in_dependency_order():
  """Every folder of the package is a row of the folder table, and a folder
  may import only folders listed before it: the folders form no cycle."""
  table = _folders()
  on_disk = {'npcface_jax/' + p.name for p in (ROOT / 'npcface_jax').iterdir()
             if (p / '__init__.py').is_file()}
  assert on_disk | {'npcface_jax (top level)', 'data_prep'} == set(table)
  order = list(table)
  for i, folder in enumerate(order):
    later = table[folder] & set(order[i:])
    assert not later, f'{folder} may import {later}, not listed before it'


def test_top_level_holds_only_the_api_and_the_commands():
  top = sorted(p.name for p in (ROOT / 'npcface_jax').glob('*.py'))
  commands = re.findall(r'^\| `npcface_jax/(\w+)\.py` \| `python -m',
                        DOC, re.MULTILINE)
  assert top == sorted(['__init__.py'] + [f'{c}.py' for c in commands])
  readme = (ROOT / 'README.md').read_text()
  for command in commands:
    if command != 'main':
      assert f'python -m npcface_jax.{command}' in readme, command


@pytest.mark.parametrize('module', _module_map())
def test_imports_follow_the_folders(module):
  """Across folders a module imports only the folders its folder may
  import (a folder's __init__ counts as the folder); inside its folder,
  only modules listed before it."""
  table, order = _folders(), {m: i for i, m in enumerate(_module_map())}
  own = _folder_of(module)
  wrong = []
  for imported in sorted(_imports(module)):
    other = _folder_of(imported)
    if other == own:
      if order.get(imported, len(order)) >= order[module] and not (
          _is_package_init(imported)):
        wrong.append(f'{imported} (listed after it in its folder)')
    elif other not in table[own]:
      wrong.append(f'{imported} ({own} may not import {other})')
  assert not wrong, f'{module} imports {wrong}'


def test_no_library_imports_a_command():
  commands = {m for m in _source_modules()
              if _folder_of(m) == 'npcface_jax (top level)'
              and not m.endswith('__init__.py')}
  for module in _source_modules():
    if _folder_of(module).startswith('npcface_jax/'):
      assert not _imports(module) & commands, module


def test_evaluation_and_serving_never_import_training():
  for module in _source_modules():
    if _folder_of(module) in ('npcface_jax/evaluation', 'npcface_jax/serving'):
      training = {m for m in _imports(module)
                  if m.startswith('npcface_jax/training/')}
      assert not training, f'{module} imports {sorted(training)}'


def test_npcface_jax_never_imports_data_prep():
  offenders = {m: sorted(i for i in _imports(m) if i.startswith('data_prep'))
               for m in _source_modules() if m.startswith('npcface_jax/')}
  assert not {m: i for m, i in offenders.items() if i}


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


def test_the_flat_layouts_paths_still_import_with_a_warning():
  """Every module path of release 0.1.0 imports (``import`` and ``from
  npcface_jax import``) as the module at its new path, the same object,
  with a DeprecationWarning naming it; the package's API needs no JAX."""
  code = '''
import importlib, sys, warnings
import npcface_jax
assert 'jax' not in sys.modules
for old, new in sorted(npcface_jax.MOVED.items()):
  if old == 'serving':  # a folder now
    continue
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    module = importlib.import_module('npcface_jax.' + old)
  assert module is importlib.import_module('npcface_jax.' + new), old
  assert [w for w in caught if w.category is DeprecationWarning
          and 'npcface_jax.' + new in str(w.message)], (old, caught)
  sys.modules.pop('npcface_jax.' + old)
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter('always')
  from npcface_jax import chunked_loss
assert chunked_loss.chunked_cross_entropy, caught
print('ok', len(npcface_jax.MOVED))
'''
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, cwd=ROOT, check=False)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ['ok', '37']  # the 0.1.0 library modules
