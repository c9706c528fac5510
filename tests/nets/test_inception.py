"""The FID Inception-v3 against a torch.nn restatement of pytorch-fid's network
(tests/nets/torch_fid_inception.py) with identical random weights, and the
pytorch-fid state-dict converter.

Tolerance, float32 on both sides: pool features and logits to 1e-4 of their largest
magnitude (measured ≤ 4.5e-5). The random network amplifies rounding (a 1e-7 input
perturbation moves its features by ~3e-5), so this is near float32's floor: torch in
float32 is ~1e-4..3e-3 from torch in float64 on these inputs, more than it is from JAX.
"""
import sys

import jax
import numpy as np
import pytest
torch = pytest.importorskip("torch")  # the reference extra (.[reference])

from torch_fid_inception import FIDInceptionV3
from diffusion_jax.nets import inception

RTOL = 1e-4
# upsampled to 299; downsampled (the resize alone is checked against torch by default)
SIZES = (32, 320)
CASES = (32, pytest.param(320, marks=pytest.mark.slow))


@pytest.fixture(scope="module")
def torch_model():
  """pytorch-fid's network with random weights that keep activations O(1): random
  BatchNorm affines, then running statistics calibrated on a batch like the test inputs
  (train-mode forward with cumulative averaging), so each BatchNorm standardises its
  input."""
  torch.manual_seed(0)
  model = FIDInceptionV3()
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      torch.nn.init.uniform_(m.weight, 0.5, 1.5)
      torch.nn.init.uniform_(m.bias, -0.5, 0.5)
      m.momentum = None
      m.reset_running_stats()
  torch.nn.init.normal_(model.fc.weight, std=2048 ** -0.5)
  torch.nn.init.uniform_(model.fc.bias, -0.1, 0.1)
  resized = [torch.nn.functional.interpolate(torch.rand(1, 3, size, size), size=(299, 299),
                                             mode="bilinear", align_corners=False)
             for size in SIZES]
  with torch.no_grad():
    model.train()(torch.cat(resized))
  return model.eval()


@pytest.fixture(scope="module")
def variables(torch_model):
  return inception.params_from_torch(torch_model.state_dict())


@pytest.fixture(scope="module")
def forward():
  return jax.jit(inception.InceptionV3().apply)


def _torch_forward(model, x):
  """pytorch-fid's input convention: x [B, H, W, 3] in [-1, 1] → NCHW in [0, 1]."""
  with torch.no_grad():
    pool, logits = model(torch.from_numpy((x.transpose(0, 3, 1, 2) + 1) / 2))
  return pool.numpy(), logits.numpy()


@pytest.mark.parametrize("size", CASES)
def test_matches_pytorch_fid(torch_model, variables, forward, size):
  x = np.random.RandomState(size).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  ref_pool, ref_logits = _torch_forward(torch_model, x)
  pool, logits = jax.device_get(forward(variables, x))
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  assert pool.dtype == logits.dtype == np.float32
  # Not degenerate: O(1) features that vary over channels and between the images.
  assert 0.1 < ref_pool.std() < 10 and 0.1 < ref_logits.std() < 10
  assert np.abs(ref_pool[0] - ref_pool[1]).mean() > 0.01 * ref_pool.std()
  for ours, ref in ((pool, ref_pool), (logits, ref_logits)):
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize("shape", [(7, 7), (17, 45), (299, 299), (320, 320), (600, 451)])
def test_resize_is_torch_bilinear(shape):
  x = np.random.RandomState(0).normal(size=(2, *shape, 3)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                        size=(299, 299), mode="bilinear", align_corners=False)
  ours = np.asarray(inception.resize_bilinear(x))
  np.testing.assert_allclose(ours, ref.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-5)


def test_parameter_count(torch_model, variables):
  count = sum(x.size for x in jax.tree.leaves(variables["params"]))
  assert count == sum(p.numel() for p in torch_model.parameters()) == 23_850_960
  assert set(inception.state_dict_from_variables(variables)) == {
      k for k in torch_model.state_dict() if not k.endswith("num_batches_tracked")}


def test_converter_names_bad_keys_and_shapes(torch_model):
  sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  missing = dict(sd)
  del missing["Mixed_6c.branch7x7dbl_3.bn.running_var"]
  with pytest.raises(ValueError, match=r"1 missing keys: Mixed_6c\.branch7x7dbl_3\.bn\.running_var"):
    inception.params_from_torch(missing)
  with pytest.raises(ValueError, match=r"1 unexpected keys: AuxLogits\.fc\.weight"):
    inception.params_from_torch({**sd, "AuxLogits.fc.weight": np.zeros((1008, 768))})
  wrong = {**sd, "Mixed_5b.branch5x5_2.conv.weight": np.zeros((64, 48, 3, 3), np.float32)}
  with pytest.raises(ValueError, match=r"Mixed_5b\.branch5x5_2\.conv\.weight: got \(64, 48, 3, 3\), "
                                       r"expected \(64, 48, 5, 5\)"):
    inception.params_from_torch(wrong)


def test_npz_and_pth_round_trip(torch_model, variables, tmp_path):
  def assert_same(a):
    jax.tree.map(np.testing.assert_array_equal, a, variables)

  inception.save_npz(str(tmp_path / "from_flax.npz"), variables)
  assert_same(inception.load_weights(str(tmp_path / "from_flax.npz")))
  inception.save_npz(str(tmp_path / "from_torch.npz"), torch_model.state_dict())
  assert_same(inception.load_weights(str(tmp_path / "from_torch.npz")))
  torch.save(torch_model.state_dict(), tmp_path / "weights.pth")
  assert_same(inception.load_weights(str(tmp_path / "weights.pth")))
  inception.convert(str(tmp_path / "weights.pth"), str(tmp_path / "converted.npz"))
  assert_same(inception.load_weights(str(tmp_path / "converted.npz")))


def test_load_weights_errors(torch_model, tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="absent.pth: no such file.*nothing is "
                                               "downloaded.*pt_inception-2015-12-05"):
    inception.load_weights(str(tmp_path / "absent.pth"))
  (tmp_path / "w.bin").write_bytes(b"")
  with pytest.raises(ValueError, match=r"expected a \.safetensors, \.pth"):
    inception.load_weights(str(tmp_path / "w.bin"))
  bad = {k: v for k, v in torch_model.state_dict().items() if not k.startswith("fc.")}
  with pytest.raises(ValueError, match="missing keys: fc.bias, fc.weight"):
    inception.save_npz(str(tmp_path / "bad.npz"), bad)
  assert not (tmp_path / "bad.npz").exists()
  (tmp_path / "w.pth").write_bytes(b"")
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(ImportError, match="pip install torch"):
    inception.load_weights(str(tmp_path / "w.pth"))
