"""The KL autoencoder (nets/autoencoder.py) against diffusers' PyTorch `AutoencoderKL`
(the test-only reference) with the same random weights, which reach the port through a
real .safetensors file; the latent-diffusion key names; the loader's errors; bf16
compute; shapes for f = 2, 4, 8 and every published preset.

Tolerance, float32 on both sides: 1e-4 absolute on μ, log σ² and x̂ (their magnitudes
are O(1) here; measured ≤ 5e-6).
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
torch = pytest.importorskip("torch")  # the reference extra (.[reference])
from safetensors.torch import save_file  # noqa: E402

from diffusion_jax.config import base
from diffusion_jax.nets import autoencoder, torch_weights

TOL = 1e-4

# Two small architectures: SD-like (quant convs, f = 4, shortcut convs in both halves) and
# FLUX-like (16 latent channels, no quant / post-quant conv, f = 2).
CONFIGS = {
    "sd_like": dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
                    norm_groups=8, use_quant_conv=True, use_post_quant_conv=True),
    "flux_like": dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=16,
                      norm_groups=8, use_quant_conv=False, use_post_quant_conv=False),
}


def _torch_vae(cfg, seed=0):
  """diffusers' AutoencoderKL of `cfg`: torch's default init, GroupNorm affine
  parameters drawn at random (not 1 / 0) so a swapped scale and bias shows."""
  AutoencoderKL = pytest.importorskip("diffusers").AutoencoderKL
  n = len(cfg["block_out_channels"])
  torch.manual_seed(seed)
  model = AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
      up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg["block_out_channels"],
      layers_per_block=cfg["layers_per_block"], latent_channels=cfg["latent_channels"],
      norm_num_groups=cfg["norm_groups"], use_quant_conv=cfg["use_quant_conv"],
      use_post_quant_conv=cfg["use_post_quant_conv"],
      mid_block_add_attention=cfg.get("mid_attention", True)).eval()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.GroupNorm):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
  return model


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def _nhwc(t):
  return t.permute(0, 2, 3, 1).numpy()


def _module(cfg, **kw):
  return autoencoder.AutoencoderKL(**cfg, **kw)


@functools.cache
def _jitted(module):
  """(encode, decode) of `module`, jitted once per architecture for the whole file."""
  enc = jax.jit(lambda v, x: module.apply(v, x, method=module.encode))
  dec = jax.jit(lambda v, z: module.apply(v, z, method=module.decode))
  return enc, dec


@pytest.fixture(scope="module")
def make_case(tmp_path_factory):
  """name → (name, cfg, torch model, its diffusers state dict, path of its .safetensors),
  built once per name."""
  @functools.cache
  def make(name):
    cfg = CONFIGS[name]
    model = _torch_vae(cfg)
    path = tmp_path_factory.mktemp("ae") / f"{name}.safetensors"
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state_dict, str(path))
    return name, cfg, model, state_dict, path
  return make


@pytest.fixture(params=sorted(CONFIGS))
def case(request, make_case):
  return make_case(request.param)


def test_matches_diffusers(case):
  name, cfg, model, _, path = case
  module = _module(cfg)
  variables = autoencoder.params_from_state_dict(torch_weights.read_state_dict(path), module)
  enc, dec = _jitted(module)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  f = 2 ** (len(cfg["block_out_channels"]) - 1)
  z = rng.standard_normal((2, 16 // f, 16 // f, cfg["latent_channels"])).astype(np.float32)
  with torch.no_grad():
    dist = model.encode(_nchw(x)).latent_dist
    want_mean, want_logvar = _nhwc(dist.mean), _nhwc(dist.logvar)
    want_x = _nhwc(model.decode(_nchw(z)).sample)
  mean, logvar = enc(variables, x)
  x_hat = dec(variables, z)
  assert mean.dtype == logvar.dtype == x_hat.dtype == jnp.float32
  assert mean.shape == logvar.shape == (2, 16 // f, 16 // f, cfg["latent_channels"])
  assert x_hat.shape == (2, 16, 16, 3)
  errs = [float(np.abs(np.asarray(a) - b).max()) for a, b in
          ((mean, want_mean), (logvar, want_logvar), (x_hat, want_x))]
  print(f"{name}: max |Δ| mean {errs[0]:.2e}, logvar {errs[1]:.2e}, decode {errs[2]:.2e}")
  assert max(errs) < TOL, errs


def _ldm_key(k: str, levels: int) -> str:
  """A diffusers AutoencoderKL key → latent-diffusion's (ldm/modules/diffusionmodules/
  model.py's Encoder / Decoder / AttnBlock; the decoder's `up` is indexed from the lowest
  resolution). Written from that layout, independently of the converter."""
  rev = lambda i: str(levels - 1 - int(i))
  rules = [
      (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
      (r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}."),
      (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
      (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
      (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
      (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
      (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
      (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{rev(m[1])}.block."),
      (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
       lambda m: f"decoder.up.{rev(m[1])}.upsample."),
      (r"\.conv_shortcut\.", ".nin_shortcut."),
  ]
  for pattern, repl in rules:
    k = re.sub(pattern, repl, k)
  return k


def _ldm_state_dict(state_dict, levels):
  out = {}
  for k, v in state_dict.items():
    if ".attentions.0.to_" in k and k.endswith(".weight"):
      v = v[:, :, None, None]   # ldm's AttnBlock q/k/v/proj_out are 1×1 convs
    out[_ldm_key(k, levels)] = v.contiguous()
  return out


def _assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_ldm_and_old_diffusers_names_load_the_same(case, tmp_path):
  _, cfg, _, state_dict, path = case
  module = _module(cfg)
  want = autoencoder.params_from_state_dict(torch_weights.read_state_dict(path), module)
  levels = len(cfg["block_out_channels"])
  ldm = _ldm_state_dict(state_dict, levels)
  assert "encoder.mid.attn_1.q.weight" in ldm and "decoder.up.0.block.0.conv1.weight" in ldm
  # a latent-diffusion training checkpoint also holds its loss's weights: ignored
  ldm["loss.discriminator.main.0.weight"] = torch.zeros(2, 3, 4, 4)
  save_file(ldm, str(tmp_path / "ldm.safetensors"))
  got = autoencoder.params_from_state_dict(
      torch_weights.read_state_dict(tmp_path / "ldm.safetensors"), module)
  _assert_same_tree(got, want)
  # a full Stable Diffusion checkpoint: the autoencoder under first_stage_model.
  full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
  full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)
  _assert_same_tree(autoencoder.params_from_state_dict(full, module), want)
  # diffusers < 0.15's attention names
  old = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
         .replace("to_out.0.", "proj_attn."): v for k, v in state_dict.items()}
  _assert_same_tree(autoencoder.params_from_state_dict(old, module), want)


def test_load_errors_name_the_keys(case, tmp_path):
  _, cfg, _, state_dict, _ = case
  module = _module(cfg)
  broken = dict(state_dict)
  del broken["decoder.conv_out.bias"]
  broken["encoder.conv_in.weight"] = torch.zeros(5, 3, 3, 3)
  broken["encoder.extra.weight"] = torch.zeros(1)
  save_file(broken, str(tmp_path / "broken.safetensors"))
  c0 = cfg["block_out_channels"][0]
  with pytest.raises(ValueError) as e:
    autoencoder.params_from_state_dict(
        torch_weights.read_state_dict(tmp_path / "broken.safetensors"), module)
  msg = str(e.value)
  assert msg.startswith("not a diffusers AutoencoderKL state dict")
  assert "1 missing keys: decoder.conv_out.bias" in msg
  assert "1 unexpected keys: encoder.extra.weight" in msg
  assert f"encoder.conv_in.weight: got (5, 3, 3, 3), expected ({c0}, 3, 3, 3)" in msg
  # in latent-diffusion's names, errors are in those names
  ldm = _ldm_state_dict(state_dict, len(cfg["block_out_channels"]))
  del ldm["encoder.mid.attn_1.q.weight"]
  with pytest.raises(ValueError, match=r"(?s)latent-diffusion.*missing keys: "
                                       r"encoder\.mid\.attn_1\.q\.weight"):
    autoencoder.params_from_state_dict(ldm, module)
  # a file of another architecture: every difference named
  other = dict(cfg, latent_channels=cfg["latent_channels"] + 4)
  with pytest.raises(ValueError, match=r"decoder\.conv_in\.weight: got"):
    autoencoder.params_from_state_dict(state_dict, _module(other))


def test_unrecognised_files_and_presets(tmp_path):
  with pytest.raises(ValueError, match=r"neither diffusers' names.*first keys: "
                                       r"features\.0\.weight"):
    autoencoder.params_from_state_dict({"features.0.weight": np.zeros(1)},
                                       _module(CONFIGS["sd_like"]))
  with pytest.raises(ValueError, match=r"autoencoder preset 'sd3': expected one of "
                                       r"\['flux', 'sd', 'sdxl'\]"):
    autoencoder.load_pretrained(tmp_path / "vae.safetensors", "sd3")
  with pytest.raises(FileNotFoundError, match=r"absent\.safetensors: no such file"):
    autoencoder.load_pretrained(tmp_path / "absent.safetensors", "sd")
  (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(ValueError, match=r"junk\.safetensors: not a readable \.safetensors"):
    torch_weights.read_state_dict(tmp_path / "junk.safetensors")
  with pytest.raises(ValueError, match=r"autoencoder\.norm_groups=8 does not divide the "
                                       r"channels \[12\]"):
    jax.eval_shape(_module(dict(CONFIGS["sd_like"], block_out_channels=(16, 12))).init,
                   jax.random.key(0), jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))


def test_load_pretrained_half_precision_file(case, tmp_path, monkeypatch):
  """load_pretrained end to end (a preset entry of the small architecture): a bfloat16
  .safetensors reads as the float32 of its values; scale and shift come from the preset."""
  name, cfg, _, state_dict, path = case
  monkeypatch.setitem(autoencoder.PRESETS, "tiny",
                      dict(cfg, in_channels=3, out_channels=3, mid_attention=True,
                           scale=0.5, shift=0.25))
  bf16 = {k: v.to(torch.bfloat16) for k, v in state_dict.items()}
  save_file(bf16, str(tmp_path / "bf16.safetensors"))
  got = torch_weights.read_state_dict(tmp_path / "bf16.safetensors")
  for k, v in bf16.items():
    assert got[k].dtype == np.float32
    np.testing.assert_array_equal(got[k], v.float().numpy())
  module, variables, scale, shift = autoencoder.load_pretrained(path, "tiny")
  assert (scale, shift) == (0.5, 0.25) and module.latent_channels == cfg["latent_channels"]
  want = autoencoder.params_from_state_dict(torch_weights.read_state_dict(path), module)
  _assert_same_tree(jax.tree.map(np.asarray, variables), want)


@pytest.mark.parametrize("name", ["sd_like", pytest.param("flux_like", marks=pytest.mark.slow)])
def test_bf16_compute(make_case, name):
  """bf16 compute and parameters: GroupNorm parameters stay float32, outputs are
  float32 and close to the float32 network's."""
  _, cfg, _, _, path = make_case(name)
  f32 = _module(cfg)
  variables = autoencoder.params_from_state_dict(torch_weights.read_state_dict(path), f32)
  bf16 = _module(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  shapes = jax.eval_shape(bf16.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
  for kp, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    names = [k.key for k in kp]
    is_norm = any(n.startswith("norm") or n == "group_norm" for n in names)
    assert leaf.dtype == (jnp.float32 if is_norm else jnp.bfloat16), names
  v16 = jax.tree.map(lambda a, s: jnp.asarray(a, s.dtype), variables, shapes)
  x = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  enc, dec = _jitted(f32)
  mean, logvar = enc(variables, x)
  want = (dec(variables, mean), mean, logvar)
  got = jax.jit(bf16.apply)(v16, x)   # (decode(mean), mean, logvar) in one program
  for a, b in zip(got, want):
    assert a.dtype == jnp.float32
    assert np.abs(np.asarray(a) - b).max() < 0.05 * np.abs(np.asarray(b)).max() + 0.02


def _shapes(module, size, batch=2):
  """(variables, mean, logvar, x̂) shapes of `module` on [batch, size, size, C] images,
  from one trace of init (which runs __call__ = (decode(mean), mean, logvar))."""
  x = jax.ShapeDtypeStruct((batch, size, size, module.in_channels), jnp.float32)
  (x_hat, mean, logvar), variables = jax.eval_shape(module.init_with_output,
                                                    jax.random.key(0), x)
  return variables, mean, logvar, x_hat


@pytest.mark.parametrize("chans,f", [((8, 16), 2), ((8, 16, 16), 4), ((8, 8, 16, 16), 8)])
def test_downsampling_factor(chans, f):
  module = autoencoder.AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=chans,
                                     layers_per_block=1, latent_channels=3, norm_groups=4)
  assert module.downsample_factor == f
  variables, mean, logvar, x_hat = _shapes(module, 32)
  assert mean.shape == logvar.shape == (2, 32 // f, 32 // f, 3)
  assert x_hat.shape == (2, 32, 32, 1)
  assert mean.dtype == logvar.dtype == x_hat.dtype == jnp.float32
  kernel = variables["params"]
  for k in autoencoder.LAST_LAYER:
    kernel = kernel[k]
  assert kernel.shape == (3, 3, chans[0], 1)   # the decoder's last conv
  bad = 32 + f // 2
  with pytest.raises(ValueError, match=rf"multiples of f={f}, got shape \(1, {bad}, {bad}, 1\)"):
    jax.eval_shape(lambda v, x: module.apply(v, x, method=module.encode), variables,
                   jax.ShapeDtypeStruct((1, bad, bad, 1), jnp.float32))
  with pytest.raises(ValueError, match=r"expected latents \[B, h, w, 3\], got shape"):
    jax.eval_shape(lambda v, z: module.apply(v, z, method=module.decode), variables,
                   jax.ShapeDtypeStruct((1, 4, 4, 4), jnp.float32))


# diffusers' published vae/config.json values, for the presets to be compared against
# (sd-legacy/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
# stabilityai/stable-diffusion-xl-base-1.0, black-forest-labs/FLUX.1-dev).
PUBLISHED = {
    "sd": dict(latent_channels=4, scaling_factor=0.18215, shift_factor=None,
               use_quant_conv=True, use_post_quant_conv=True),
    "sdxl": dict(latent_channels=4, scaling_factor=0.13025, shift_factor=None,
                 use_quant_conv=True, use_post_quant_conv=True),
    "flux": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False),
}


@pytest.mark.parametrize("preset", sorted(autoencoder.PRESETS))
def test_presets(preset):
  """Each preset builds (no weights), maps 256² images to 32² latents, has exactly the
  keys and shapes of diffusers' AutoencoderKL of the published config (built on torch's
  meta device: no memory, no init) and the published scale / shift."""
  AutoencoderKL = pytest.importorskip("diffusers").AutoencoderKL
  spec, pub = autoencoder.PRESETS[preset], PUBLISHED[preset]
  module = autoencoder.from_preset(preset)
  _, mean, logvar, x_hat = _shapes(module, 256, batch=1)
  assert mean.shape == logvar.shape == (1, 32, 32, pub["latent_channels"])
  assert x_hat.shape == (1, 256, 256, 3)
  assert spec["scale"] == pub["scaling_factor"] and spec["shift"] == (pub["shift_factor"] or 0)
  with torch.device("meta"):
    ref = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
        latent_channels=pub["latent_channels"], use_quant_conv=pub["use_quant_conv"],
        use_post_quant_conv=pub["use_post_quant_conv"])
  want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  assert autoencoder.state_dict_shapes(module) == want


def test_without_mid_attention_and_from_config():
  cfg = dict(CONFIGS["flux_like"], mid_attention=False)
  state_dict = _torch_vae(cfg).state_dict()
  assert not any("attentions" in k for k in state_dict)
  params = autoencoder.params_from_state_dict(state_dict, _module(cfg))["params"]
  assert "attention" not in params["encoder"]["mid_block"]
  c = base().autoencoder
  module = autoencoder.from_config(c, channels=1, dtype="bfloat16", param_dtype="float32")
  assert (module.block_out_channels, module.layers_per_block, module.latent_channels,
          module.in_channels, module.out_channels, module.dtype) == (
              tuple(c.channels), c.layers_per_block, c.latent_channels, 1, 1, jnp.bfloat16)
  _, mean, _, x_hat = _shapes(module, 16)
  assert mean.shape == (2, 8, 8, c.latent_channels) and x_hat.shape == (2, 16, 16, 1)
