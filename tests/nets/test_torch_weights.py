"""torch_weights beyond what the Inception and LPIPS converter tests exercise: the
file-reading errors, tensor conversion and the mismatch report's truncation."""
import sys

import numpy as np
import pytest
torch = pytest.importorskip("torch")  # the reference extra (.[reference])

from diffusion_jax.nets import torch_weights


def test_read_state_dict_errors(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match=r"w\.bin: expected a \.safetensors, \.pth/\.pt \(torch\) or \.npz"):
    torch_weights.read_state_dict(tmp_path / "w.bin")
  with pytest.raises(FileNotFoundError, match=r"absent\.npz: no such file"):
    torch_weights.read_state_dict(tmp_path / "absent.npz")
  (tmp_path / "w.pth").write_bytes(b"")
  monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` now raises ImportError
  with pytest.raises(ImportError, match=r"w\.pth needs torch: `pip install torch`.*save_npz"):
    torch_weights.read_state_dict(tmp_path / "w.pth")


def test_to_numpy_and_npz_round_trip(tmp_path):
  t = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3).requires_grad_()
  a = torch_weights.to_numpy(t)
  assert a.dtype == np.float32
  np.testing.assert_array_equal(a, np.arange(6).reshape(2, 3))
  torch_weights.save_npz(tmp_path / "w.npz", {"a.weight": t, "head.bias": np.zeros(2)},
                         skip_prefixes=("head.",))
  got = torch_weights.read_state_dict(tmp_path / "w.npz")
  assert list(got) == ["a.weight"] and got["a.weight"].dtype == np.float32


def test_check_state_dict():
  expected = {f"k{i:02d}": (2,) for i in range(25)}
  given = {"k03": np.zeros(2, np.int64), "k00": torch.ones(2), "k01": np.zeros(3),
           "bn.num_batches_tracked": np.int64(7), "head.w": np.zeros(1)}
  with pytest.raises(ValueError) as e:
    torch_weights.check_state_dict(given, expected, "a test state dict",
                                   ignore_prefixes=("head.",))
  missing = [k for k in expected if k not in given]   # 22: only the first 20 are named
  assert str(e.value).splitlines() == [
      "not a test state dict:",
      "  22 missing keys: " + ", ".join(missing[:20]) + ", ...",
      "  1 shape mismatches: k01: got (3,), expected (2,)"]
  out = torch_weights.check_state_dict({**given, "k01": np.zeros(2)},
                                       {"k03": (2,), "k00": (2,), "k01": (2,)},
                                       "a test state dict", ignore_prefixes=("head.",))
  assert list(out) == ["k03", "k00", "k01"]   # expected's order
  assert all(v.dtype == np.float32 for v in out.values())
