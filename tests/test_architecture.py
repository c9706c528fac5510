"""The layering of docs/architecture.md holds for imports: import-linter's contracts
(pyproject.toml, [tool.importlinter]) pass on the package, and fail on a copy of it
with one deliberate upward import (so the check can fail)."""
import os
import shutil
import subprocess
import sys

from conftest import ROOT

# lint-imports of this interpreter's import-linter (the console script's entry point).
LINT_IMPORTS = [sys.executable, "-c",
                "import sys; from importlinter.cli import lint_imports_command; "
                "sys.exit(lint_imports_command())", "--no-cache"]


def lint_imports(cwd: str) -> subprocess.CompletedProcess:
  """lint-imports run in `cwd` (it reads cwd/pyproject.toml and puts cwd first on
  sys.path, so the packages found there are the ones analysed)."""
  return subprocess.run(LINT_IMPORTS, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
  proc = lint_imports(ROOT)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-6000:]
  assert "BROKEN" not in out and " 0 broken" in out, out[-6000:]


def test_an_upward_import_breaks_the_contracts(tmp_path):
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  shutil.copytree(os.path.join(ROOT, "diffusion_jax"), tmp_path / "diffusion_jax", ignore=ignore)
  # launch/ installs as diffusion_jax_launch: the copy has it under that name.
  shutil.copytree(os.path.join(ROOT, "launch"), tmp_path / "diffusion_jax_launch", ignore=ignore)
  shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
  paths = tmp_path / "diffusion_jax" / "diffusion" / "paths.py"
  source = paths.read_text(encoding="utf-8")
  future = "from __future__ import annotations\n"
  assert future in source
  paths.write_text(source.replace(future, future + "import diffusion_jax.training\n", 1),
                   encoding="utf-8")

  proc = lint_imports(str(tmp_path))
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0, out[-6000:]
  assert "BROKEN" in out, out[-6000:]
  assert "diffusion_jax.diffusion is not allowed to import diffusion_jax.training" in out, out
  assert "diffusion_jax.diffusion.paths -> diffusion_jax.training" in out, out
