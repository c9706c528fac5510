"""Every objective and every sampler in a real (small) training run through the command
line: each row trains a few steps of the diffusion task with `launch/train.py`'s entry
point (in this process, on 1 device; its end-of-run sample grid uses the row's
sampler), then samples with `launch/sample.py` (a separate process).
Together the rows cover every path, prediction, loss weighting, time sampling and
sampler. One row runs by default; `-m slow` runs the rest."""
import numpy as np
import pytest

from conftest import quickstart_args, read_metrics, run_cli, run_train_in_process

_slow = pytest.mark.slow  # each row compiles its own step and sampler (~25-30 s)
ROWS = [  # path, prediction, loss weight, time sampling, sampler
    ("edm", "edm", "edm", "uniform", "edm"),                  # EDM preconditioning + sampler
    pytest.param("ve", "score", "snr", "uniform", "annealed_langevin", marks=_slow),  # NCSN
    pytest.param("vp_linear", "v", "min_snr", "logit_normal", "pc", marks=_slow),
    pytest.param("sub_vp", "eps", "uniform", "uniform", "sde", marks=_slow),
    pytest.param("vp_discrete", "eps", "vlb", "discrete", "ddpm", marks=_slow),  # DDPM's bound
    pytest.param("vp_cosine", "x", "snr", "uniform", "dpm_solver_2m", marks=_slow),
    pytest.param("flow", "velocity", "uniform", "logit_normal", "heun", marks=_slow),
    pytest.param("vp_discrete", "eps", "uniform", "discrete", "ddim", marks=_slow),
    pytest.param("flow", "x", "uniform", "uniform", "euler", marks=_slow),
]


@pytest.mark.parametrize("path,prediction,weight,time_sampling,sampler", ROWS)
def test_objective_and_sampler_through_the_command_line(data_dir, tmp_path, path, prediction,
                                                       weight, time_sampling, sampler):
  flags = [f"--config.diffusion.path={path}", f"--config.diffusion.prediction={prediction}",
           f"--config.diffusion.loss_weight={weight}",
           f"--config.diffusion.time_sampling={time_sampling}",
           "--config.diffusion.t_min=0.02", f"--config.sample.sampler={sampler}",
           "--config.sample.num_steps=3", "--config.optim.warmup_steps=0",
           "--config.train.num_steps=3", "--config.train.log_every=1"]
  if path == "edm":
    flags += ["--config.diffusion.sigma_min=0.002", "--config.diffusion.sigma_max=80.0"]
  if path == "vp_discrete" and sampler == "ddim":
    flags += ["--config.diffusion.beta_schedule=cosine"]
  run_train_in_process(quickstart_args(tmp_path, data_dir, *flags))
  metrics = read_metrics(tmp_path)
  assert [m["step"] for m in metrics] == [1, 2, 3]
  assert all(np.isfinite(m["loss"]) and m["nonfinite"] == 0 and m["grad_norm"] > 0
             for m in metrics)
  assert (tmp_path / "samples" / "step_0000003.png").exists()
  out = tmp_path / "s.npz"  # sample refuses non-finite samples, naming the sampler
  run_cli("sample", [f"--workdir={tmp_path}", "--num_samples=4", f"--output={out}"])
  assert np.load(out)["images"].shape == (4, 8, 8, 1)
