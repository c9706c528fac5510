"""The launch guard: a process that SLURM, Open MPI or a multi-host TPU slice starts as
one of several (what jax.distributed.initialize() reads, jax/_src/clusters/) stops
before any work unless --distributed joins it to the others or --single_process says
one process is intended (launch/common.py: `multi_process_launch`, `launch_error`)."""
import os

import pytest

from conftest import ROOT, run_cli
from diffusion_jax_launch.common import launch_error, multi_process_launch


@pytest.mark.parametrize("env, var", [
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, "SLURM_NTASKS=4"),
    ({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_STEP_NUM_TASKS=2"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, "OMPI_COMM_WORLD_SIZE=2"),
    ({"PMI_SIZE": "16"}, "PMI_SIZE=16"),
    ({"MEGASCALE_NUM_SLICES": "2"}, "MEGASCALE_NUM_SLICES=2"),
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}, "TPU_WORKER_HOSTNAMES=t-0,t-1,t-2,t-3"),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, "TPU_PROCESS_ADDRESSES="),
])
def test_multi_process_environments_are_detected(env, var):
  reason = multi_process_launch(env)
  assert reason is not None and var in reason


@pytest.mark.parametrize("env", [
    {},
    {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"},
    # srun -n 1 inside a larger allocation: the step's own count wins.
    {"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "1"},
    {"OMPI_COMM_WORLD_SIZE": "1"},
    {"SLURM_NTASKS": "", "PMI_SIZE": "many"},
    {"TPU_WORKER_HOSTNAMES": "localhost"},
    {"MEGASCALE_NUM_SLICES": "1"},
    # jax reads TPU_PROCESS_ADDRESSES first when it is set.
    {"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476", "TPU_WORKER_HOSTNAMES": "a,b"},
])
def test_single_process_environments_pass(env):
  assert multi_process_launch(env) is None


def test_launch_error_names_the_variable_and_both_remedies():
  env = {"SLURM_NTASKS": "2"}
  error = launch_error(env, distributed=False, single_process=False)
  assert "SLURM" in error and "SLURM_NTASKS=2" in error
  assert "--distributed" in error and "--single_process" in error
  assert launch_error(env, distributed=True, single_process=False) is None
  assert launch_error(env, distributed=False, single_process=True) is None
  assert launch_error({}, distributed=False, single_process=False) is None
  assert "contradicts" in launch_error({}, distributed=True, single_process=True)


def test_command_line_stops_before_any_work_unless_told(tmp_path):
  """diffusion-jax-train under SLURM with 2 tasks and no --distributed: exit 1 with the
  guard's message, and not even the workdir is made; with --single_process it goes on
  (to the config check, which a negative checkpoint interval fails at once)."""
  env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "1"}
  workdir = tmp_path / "run"
  args = [f"--config={os.path.join(ROOT, 'configs', 'quickstart.py')}", f"--workdir={workdir}",
          "--config.train.checkpoint_every=-1"]
  stopped = run_cli("train", args, env=env, check=False, timeout=120)
  assert stopped.returncode == 1, stopped.stderr[-2000:]
  assert "SLURM_NTASKS=2" in stopped.stderr and "--single_process" in stopped.stderr
  assert not workdir.exists()

  told = run_cli("train", [*args, "--single_process"], env=env, check=False, timeout=120)
  assert told.returncode == 1, told.stderr[-2000:]
  assert "SLURM_NTASKS" not in told.stderr
  assert "checkpoint_every" in told.stderr
  assert workdir.exists()
