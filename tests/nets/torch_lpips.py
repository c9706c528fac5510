"""A PyTorch reference for LPIPS-VGG, written from torchvision's vgg16 and the lpips
package v0.1 (torch.nn only: torchvision is not installable here).

`VGG16` has torchvision's `features` Sequential (same indices, so its state dict keys
are `features.N.weight`/`.bias`; no classifier) and its weight init; `forward` returns
the outputs of indices 3, 8, 15, 22, 29 (relu1_2 … relu5_3) as the package's
`pretrained_networks.vgg16` slices do. `LPIPS` follows `lpips.LPIPS(net='vgg',
version='0.1')`'s forward with `lin{k}.model = Sequential(Dropout, Conv2d(C, 1, 1,
bias=False))`, so its lin keys are `lin{k}.model.1.weight`. NCHW throughout.
"""
import torch
from torch import nn

CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
TAPS = (3, 8, 15, 22, 29)   # features[i] is the last ReLU of a stage


class VGG16(nn.Module):

  def __init__(self):
    super().__init__()
    layers, cin = [], 3
    for v in CFG:
      if v == "M":
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
      else:
        layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
        cin = v
    self.features = nn.Sequential(*layers)
    for m in self.modules():   # torchvision's VGG._initialize_weights, conv part
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.constant_(m.bias, 0)

  def forward(self, x):
    outs = []
    for i, layer in enumerate(self.features[:TAPS[-1] + 1]):
      x = layer(x)
      if i in TAPS:
        outs.append(x)
    return outs


class NetLinLayer(nn.Module):

  def __init__(self, chn_in):
    super().__init__()
    self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, 1, stride=1, padding=0,
                                                       bias=False))

  def forward(self, x):
    return self.model(x)


def normalize_tensor(x, eps=1e-10):
  return x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + eps)


def spatial_average(x, keepdim=True):
  return x.mean([2, 3], keepdim=keepdim)


class LPIPS(nn.Module):
  """d(in0, in1) [B, 1, 1, 1] for images [B, 3, H, W] in [-1, 1]; call .eval() first."""

  def __init__(self):
    super().__init__()
    self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
    self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])
    self.net = VGG16()
    self.lins = nn.ModuleList([NetLinLayer(c) for c in (64, 128, 256, 512, 512)])
    for k, lin in enumerate(self.lins):   # the package's attribute names lin0..lin4
      setattr(self, f"lin{k}", lin)

  def forward(self, in0, in1):
    outs0 = self.net((in0 - self.shift) / self.scale)
    outs1 = self.net((in1 - self.shift) / self.scale)
    val = 0
    for k in range(len(outs0)):
      diff = (normalize_tensor(outs0[k]) - normalize_tensor(outs1[k])) ** 2
      val = val + spatial_average(self.lins[k](diff), keepdim=True)
    return val

  def lin_state_dict(self):
    """The lpips package's vgg.pth layout: only `lin{k}.model.1.weight`."""
    return {k: v for k, v in self.state_dict().items() if k.startswith("lin")
            and not k.startswith("lins.")}
