"""The quickstart through its real command line (slow: ~2 minutes on 2 cores)."""
import json

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_quickstart_samples_are_recognisable(data_dir, tmp_path):
  proc = run_cli("quickstart", [f"--workdir={tmp_path}", f"--config.data.data_dir={data_dir}"],
                 timeout=900, optimize=True)
  report = json.loads((tmp_path / "quickstart_report.json").read_text())
  assert report["classifier_test_accuracy"] > 0.95
  assert report["sample_accuracy"] >= 0.9, report
  assert (tmp_path / "quickstart_samples.png").exists()
  assert "quickstart_samples.png" in proc.stdout
