"""The public API (docs/api.md): every name of every `__all__` resolves, `import
diffusion_jax` stays cheap, and the research script of docs/api.md runs as written on a
tiny trained run."""
import importlib
import os
import pkgutil
import re
import subprocess
import sys

import numpy as np

from conftest import ROOT, tiny_config

MARKER = "<!-- tests/test_api.py runs the next python block -->"


def _modules():
  """diffusion_jax and every module and subpackage in it, imported: [(name, is_package)]."""
  import diffusion_jax
  found = [("diffusion_jax", True)]
  for info in pkgutil.walk_packages(diffusion_jax.__path__, "diffusion_jax."):
    importlib.import_module(info.name)
    found.append((info.name, info.ispkg))
  return found


def test_every_name_in_every_all_resolves():
  checked = 0
  for name, is_package in _modules():
    module = sys.modules[name]
    if is_package:
      assert hasattr(module, "__all__"), f"{name}/__init__.py has no __all__"
    names = getattr(module, "__all__", None)
    if names is None:
      continue
    assert len(set(names)) == len(names), f"{name}.__all__ repeats a name"
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names {missing}, which {name} does not have"
    checked += len(names)
  assert checked > 100
  # The lazy top level gives the same modules as a plain import.
  import diffusion_jax
  import diffusion_jax.samplers.solvers
  assert diffusion_jax.samplers.solvers.euler is diffusion_jax.samplers.euler
  assert set(dir(diffusion_jax)) >= set(diffusion_jax.__all__)


def test_import_is_cheap_and_loads_no_launch_code_or_torch():
  code = (
      "import sys\n"
      "import diffusion_jax\n"
      "assert 'jax' not in sys.modules, 'import diffusion_jax imported jax'\n"
      "for name in diffusion_jax.__all__:\n"
      "  module = getattr(diffusion_jax, name)\n"
      "  for sub in getattr(module, '__all__', ()):\n"
      "    getattr(module, sub)\n"
      "bad = sorted(m for m in sys.modules\n"
      "             if m.split('.')[0] in ('torch', 'diffusion_jax_launch', 'diffusion_jax_configs'))\n"
      "assert not bad, bad\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]


def script() -> str:
  """The research script of docs/api.md: the python block after the marker."""
  with open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8") as f:
    text = f.read()
  assert text.count(MARKER) == 1, f"docs/api.md needs exactly one {MARKER!r}"
  match = re.match(r"\s*```python\n(.*?)\n```", text.split(MARKER, 1)[1], re.S)
  assert match, "docs/api.md: no ```python block right after the marker"
  return match.group(1)


def test_research_script_of_api_md(data_dir, tmp_path, monkeypatch):
  from diffusion_jax.training import loop
  workdir = str(tmp_path / "run")
  loop.train(tiny_config(data_dir, **{"train.num_steps": 4, "sample.per_class": 0}), workdir)

  monkeypatch.setenv("WORKDIR", workdir)
  namespace = {"__name__": "__main__"}
  exec(compile(script(), os.path.join(ROOT, "docs", "api.md"), "exec"), namespace)

  results = namespace["results"]
  # The script's Euler loop on the library's grid is the library's Euler.
  assert results["psnr_custom_vs_library_euler"] > 60, results
  assert np.isfinite(results["psnr_vs_heun"]), results
  assert 0 <= results["fd_pixels"] < np.inf and 0 <= results["fd_pixels_heun"] < np.inf, results
  ours = namespace["ours"]
  assert ours.shape == (namespace["NUM_SAMPLES"], 8, 8, 1)
  assert np.all(np.isfinite(ours)) and np.abs(ours).max() <= 1 + 1e-5  # thresholded x̂₀
  assert namespace["run"].step == 4
