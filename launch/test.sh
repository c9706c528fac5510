#!/usr/bin/env bash
# The test command (README.md; .ci/run runs exactly this): creates ./.venv if it is not
# there, installs diffusion_jax with its `test` and `reference` extras at the versions CI
# tests (.ci/constraints.txt), then runs pytest with the arguments given:
#   ./launch/test.sh                 # the default set (not `slow`)
#   ./launch/test.sh -m slow         # the long runs
#   ./launch/test.sh tests/test_cli.py -x
# The install is skipped while pyproject.toml and the constraints are the ones it installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
stamp=.venv/.diffusion_jax_test_install
want=$(cat pyproject.toml .ci/constraints.txt | cksum)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q -c .ci/constraints.txt -e '.[test,reference]'
  echo "$want" > "$stamp"
fi
exec .venv/bin/python -m pytest "$@"
