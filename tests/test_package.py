"""The package stands alone: it never imports `configs/`, and its commands run from any folder."""
import ast
import os
import pathlib
import re
import subprocess
import sys

import vit_jax_ft

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = pathlib.Path(vit_jax_ft.__file__).parent


def _imported_modules(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      yield node.module


def test_the_package_never_imports_the_experiment_configs():
  offenders = [(str(path.relative_to(PACKAGE)), module)
               for path in PACKAGE.rglob('*.py') for module in _imported_modules(path)
               if module.split('.')[0] in ('configs', 'bench', 'tests')]
  assert not offenders


def test_documented_commands_run_from_any_folder(tmp_path):
  commands = sorted(set(re.findall(r'python -m (vit_jax_ft(?:\.[a-z_]+)+)\b',
                                   (ROOT / 'README.md').read_text())))
  assert 'vit_jax_ft.main' in commands and 'vit_jax_ft.evaluate' in commands
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  # Each command in its own process (their absl flags would clash in one), all at once.
  runs = {name: subprocess.Popen([sys.executable, '-m', name, '--helpshort'], cwd=tmp_path,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
          for name in commands}
  for name, process in runs.items():
    output, _ = process.communicate(timeout=300)
    # absl prints the module's usage and flags, then exits with 1 after --helpshort.
    message = f'{name}: {output[-3000:]}'
    assert 'Traceback' not in output and process.returncode in (0, 1), message
    assert 'python -m ' + name in output and 'flags:' in output, message
