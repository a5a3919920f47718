"""DeepFocus networks. Every model maps a patch pair to a correction and a score.

Common interface (so the estimator, training and TorchScript export treat them alike):
``forward(pair, pixel_size_nm) -> (B, 4)`` where ``pair`` is (B, 2, H, W), the wd - d
and wd + d patches scaled to [-1, 1], and the columns are the correction to add in um
(delta wd, astigmatism x, astigmatism y in the image frame) and a score logit used for
the softmax-weighted consensus over patches (0 for models without a score).

- ``BaselineNet``: the thesis network (planar 1 x k x k 3-D convolutions so both images
  share weights, 7 blocks of 20-70 channels, fully connected 250-50-3).
- ``PatchScoreNet``: the same body with a fourth (score) output.
- ``PixelScoreUNet``: a 3-D U-Net of planar blocks with group norm that predicts 4
  values per pixel; the per-pixel scores weight the per-pixel corrections.
- ``SpectralNet``: the CPU model. ``SpectralFrontEnd`` (two FFTs per pair) feeds a small
  convolution over the polar map and three fully connected layers.

The last three fully connected layers of each model are named ``fc1``-``fc3`` (or
``fc``) so recalibration can fine-tune only them.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .features import SpectralFrontEnd

OUTPUT_SCALE_UM = 10.0   # the networks regress corrections in units of 10 um


class _PlanarBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, dropout: float = 0.1):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, (1, k, k), padding=(0, k // 2, k // 2))
        self.bn = nn.BatchNorm3d(cout)
        self.drop = nn.Dropout3d(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return self.drop(F.max_pool3d(x, (1, 2, 2)))


class BaselineNet(nn.Module):
    """The thesis' image-to-scalar network; ``n_out`` 3 (plain) or 4 (patch score)."""

    def __init__(self, n_out: int = 3, channels: tuple[int, ...] = (20, 30, 40, 50, 60, 70, 70)):
        super().__init__()
        self.output_scale = OUTPUT_SCALE_UM
        blocks = []
        cin = 1
        for i, c in enumerate(channels):
            blocks.append(_PlanarBlock(cin, c, k=5 if i == 0 else 3))
            cin = c
        self.body = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool3d((2, 4, 4))
        self.fc1 = nn.Linear(cin * 2 * 16, 250)
        self.fc2 = nn.Linear(250, 50)
        self.fc3 = nn.Linear(50, n_out)
        self.n_out = n_out

    def forward(self, pair: torch.Tensor, pixel_size_nm: float) -> torch.Tensor:
        x = self.body(pair.unsqueeze(1))
        x = torch.flatten(self.pool(x), 1)
        x = self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))
        out = x[:, :3] * self.output_scale
        score = x[:, 3:4] if self.n_out == 4 else torch.zeros_like(x[:, :1])
        return torch.cat([out, score], dim=1)


class PatchScoreNet(BaselineNet):
    def __init__(self) -> None:
        super().__init__(n_out=4)


class _UBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.c1 = nn.Conv3d(cin, cout, (1, 3, 3), padding=(0, 1, 1))
        self.n1 = nn.GroupNorm(8, cout)
        self.c2 = nn.Conv3d(cout, cout, (1, 3, 3), padding=(0, 1, 1))
        self.n2 = nn.GroupNorm(8, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.n2(self.c2(F.relu(self.n1(self.c1(x))))))


class PixelScoreUNet(nn.Module):
    """3-D U-Net with planar blocks (32 start filters); 4 outputs per pixel, score-weighted."""

    def __init__(self, start: int = 32, depth: int = 3):
        super().__init__()
        self.output_scale = OUTPUT_SCALE_UM
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        self.upconv = nn.ModuleList()
        cin = 1
        chans = []
        for i in range(depth):
            c = start * 2 ** i if i < 2 else start * 2
            self.down.append(_UBlock(cin, c))
            chans.append(c)
            cin = c
        for i in range(depth - 2, -1, -1):
            self.upconv.append(nn.ConvTranspose3d(cin, chans[i], (1, 2, 2), stride=(1, 2, 2)))
            self.up.append(_UBlock(2 * chans[i], chans[i]))
            cin = chans[i]
        # both images meet in the head: the depth-2 kernel mixes wd - d with wd + d
        self.head = nn.Conv3d(cin, 16, (2, 1, 1))
        self.fc = nn.Conv2d(16, 4, 1)

    def forward(self, pair: torch.Tensor, pixel_size_nm: float) -> torch.Tensor:
        x = pair.unsqueeze(1)
        skips: list[torch.Tensor] = []
        for i, blk in enumerate(self.down):
            x = blk(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = F.max_pool3d(x, (1, 2, 2))
        j = 0
        for up, blk in zip(self.upconv, self.up):
            x = up(x)
            x = blk(torch.cat([x, skips[len(skips) - 1 - j]], dim=1))
            j += 1
        x = F.relu(self.head(x)).squeeze(2)
        per_pixel = self.fc(x).flatten(2)                   # (B, 4, H*W)
        w = torch.softmax(per_pixel[:, 3], dim=1).unsqueeze(1)
        out = (per_pixel[:, :3] * w).sum(dim=2) * self.output_scale
        score = torch.logsumexp(per_pixel[:, 3], dim=1, keepdim=True)
        return torch.cat([out, score], dim=1)


class SpectralNet(nn.Module):
    """Spectral-ratio front end, a small convolution over the polar map, three FC layers."""

    def __init__(self, n_r: int = 20, n_theta: int = 12, width: int = 32, hidden: int = 256):
        super().__init__()
        self.output_scale = OUTPUT_SCALE_UM
        self.front = SpectralFrontEnd(n_r=n_r, n_theta=n_theta)
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc1 = nn.Linear(width * n_r * n_theta // 4 + 3 * n_r * n_theta, hidden)
        self.fc2 = nn.Linear(hidden, hidden // 2)
        self.fc3 = nn.Linear(hidden // 2, 4)

    def head(self, feat: torch.Tensor) -> torch.Tensor:
        """Head on precomputed front-end features (training runs on cached features)."""
        x = F.relu(self.conv1(feat))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.cat([torch.flatten(x, 1), torch.flatten(feat, 1)], dim=1)
        x = self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))
        return torch.cat([x[:, :3] * self.output_scale, x[:, 3:4]], dim=1)

    def forward(self, pair: torch.Tensor, pixel_size_nm: float) -> torch.Tensor:
        return self.head(self.front(pair, pixel_size_nm))

    @torch.jit.export
    def forward_mirror_averaged(self, pair: torch.Tensor, pixel_size_nm: float) -> torch.Tensor:
        """``forward`` averaged with the answer for the same pairs mirrored left to right, whose astigmatism along
        the diagonals (the third column) changes sign. The mirrored pairs are as real as the originals (the scan
        lines stay lines), and the two answers' errors are partly independent."""
        feat, mirrored = self.front.forward_mirrored(pair, pixel_size_nm)
        b = pair.shape[0]
        out = self.head(torch.cat([feat, mirrored]))
        sign = torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=out.dtype, device=out.device)
        return 0.5 * (out[:b] + out[b:] * sign)


# Sign of each output (wd, ax, ay, score) for a pair mirrored left to right (astigmatism along the diagonals turns
# over), for a pair swapped (the wd + d frame read as the wd - d one: the probe for aberration M is the probe for
# -M, a disc being symmetric, so the swapped pair is the pair of the opposite aberration), and for both.
MIRRORED_SIGN = (1.0, 1.0, -1.0, 1.0)
SWAPPED_SIGN = (-1.0, -1.0, -1.0, 1.0)
SWAPPED_MIRRORED_SIGN = (-1.0, -1.0, 1.0, 1.0)


class _Head(nn.Module):
    """A spectral model's head as a module of its own, so that it can be frozen apart from the front end."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.model.head(feat)


@contextlib.contextmanager
def quiet_torchscript():
    """Without torch's deprecation notices for TorchScript, this project's model format: they say nothing a user
    can act on, and ``deepfocus`` commands printed one for every model they opened."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def load_torchscript(path, map_location, extra_files: dict):
    """``torch.jit.load`` without the deprecation notice."""
    with quiet_torchscript():
        return torch.jit.load(str(path), map_location=map_location, _extra_files=extra_files)


def cpu_head(model: nn.Module):
    """A spectral model's head frozen with its weights and its convolutions laid out for oneDNN ahead of time; the
    model's own head where that cannot be done.

    The head runs on small maps (20 x 12 bins) in batches of 4 x the patch pairs, where re-laying out the weights
    and the maps on every call costs as much as the arithmetic: frozen, a head of 32 maps took 1.4 ms against 2.2
    ms on 2 cores, and an estimate 9.7 against 10.1 ms (deepfocus/README.md, "Compute"). Answers agree to 2e-6 um.
    For inference only: the frozen copy no longer follows the model's parameters."""
    try:
        with quiet_torchscript():
            return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(_Head(model)).eval()))
    except (RuntimeError, AttributeError, torch.jit.Error, torch.jit.frontend.FrontendError):
        # a model TorchScript cannot compile or freeze: its head as it is (slower, the same answers)
        return model.head


def symmetry_averaged(model: nn.Module, mirror: bool = True, head=None):
    """A spectral model's answer averaged over the pair swapped (and mirrored, with ``mirror``), as a function of
    (pair, pixel_size_nm); None for a model without the spectral front end and head.

    Swapping the frames only turns the sign of the log ratio in the front end's map (its level and mask stay), so
    the swapped pairs cost one more pass of the small head, no transform. The model answers the swapped pair not
    quite as the negative of the pair itself, mostly through the field's own structure far from focus; averaging
    the two took the first correction's stigmator error from the corners of the range from 0.21 to 0.18 units
    (three sets of 32 starts; deepfocus/README.md, "Swapped frames"). ``head``: the head to run (``cpu_head``),
    the model's own by default."""
    front = getattr(model, "front", None)
    if front is None or getattr(model, "head", None) is None or not hasattr(front, "forward_mirrored"):
        return None
    head = head or model.head
    # built once: the loop calls this for every estimate
    sign = torch.tensor([(1.0, 1.0, 1.0, 1.0), MIRRORED_SIGN, SWAPPED_SIGN, SWAPPED_MIRRORED_SIGN] if mirror else
                        [(1.0, 1.0, 1.0, 1.0), SWAPPED_SIGN]).unsqueeze(1)

    def forward(pair: torch.Tensor, pixel_size_nm: float) -> torch.Tensor:
        # the mirrored map only where it is asked for: it costs a grouping of the whole spectrum
        maps = list(front.forward_mirrored(pair, pixel_size_nm)) if mirror else [front(pair, pixel_size_nm)]
        swapped = [m.clone() for m in maps]
        for m in swapped:
            m[:, 0].neg_()
        out = head(torch.cat(maps + swapped))
        s = sign.to(dtype=out.dtype, device=out.device)
        return (out.reshape(s.shape[0], pair.shape[0], -1) * s).mean(dim=0)
    return forward


ARCHITECTURES = {
    "baseline": BaselineNet,
    "patch_score": PatchScoreNet,
    "pixel_score": PixelScoreUNet,
    "spectral": SpectralNet,
}


def build(arch: str, **kwargs) -> nn.Module:
    try:
        cls = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}") from None
    return cls(**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
