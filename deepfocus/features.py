"""Spectral-ratio front end: the image pair reduced to a small polar map of its power spectra.

With the pair taken at wd - d and wd + d the specimen spectrum cancels in the ratio of
the two power spectra (exactly under a Gaussian probe, approximately under the
geometric one), so the ratio carries the aberration nearly independent of what is
imaged. Binning is done in physical angular frequency (rad/um) so that one map
layout serves every pixel size; bins beyond a frame's Nyquist limit are masked.
Angles cover [0, pi) because power spectra of real images are point-symmetric and
astigmatism is two-fold.
"""
import math
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


# patch layouts (size, pixel size) the front end keeps built
MAX_LAYOUTS = 8


class SpectralFrontEnd(nn.Module):
    """(B, 2, H, W) pair scaled to [-1, 1] -> (B, 3, n_r, n_theta): log ratio, log power, mask."""

    # the type TorchScript reads for the kept layouts (this module does without postponed annotations for it)
    _layouts: Dict[str, List[torch.Tensor]]

    def __init__(self, n_r: int = 20, n_theta: int = 12, k_min_rad_per_um: float = 5.0,
                 k_max_rad_per_um: float = 320.0):
        super().__init__()
        self.n_r = n_r
        self.n_theta = n_theta
        self.log_k_min = math.log(k_min_rad_per_um)
        self.log_k_max = math.log(k_max_rad_per_um)
        self._layouts = {}
        self.max_layouts = MAX_LAYOUTS

    def bin_index(self, h: int, w: int, pixel_size_nm: float, device: torch.device) -> torch.Tensor:
        p_um = pixel_size_nm * 1e-3
        kx = 2.0 * math.pi * torch.fft.rfftfreq(w, d=p_um, device=device)
        ky = 2.0 * math.pi * torch.fft.fftfreq(h, d=p_um, device=device)
        kxx = kx.unsqueeze(0).expand(h, kx.shape[0])
        kyy = ky.unsqueeze(1).expand(h, kx.shape[0])
        k = torch.sqrt(kxx * kxx + kyy * kyy)
        theta = torch.remainder(torch.atan2(kyy, kxx), math.pi)
        r_idx = torch.floor((torch.log(k.clamp(min=1e-6)) - self.log_k_min)
                            / (self.log_k_max - self.log_k_min) * self.n_r).long()
        t_idx = torch.floor(theta / math.pi * self.n_theta).long().clamp(0, self.n_theta - 1)
        idx = r_idx * self.n_theta + t_idx
        outside = (r_idx < 0) | (r_idx >= self.n_r)
        # one spare bin collects everything outside the map
        return torch.where(outside, torch.full_like(idx, self.n_r * self.n_theta), idx).reshape(-1)

    def layout(self, h: int, w: int, pixel_size_nm: float, dtype: torch.dtype,
               device: torch.device) -> List[torch.Tensor]:
        """[window, bin index, per-bin norm, mask] for patches of h x w px at this pixel size, kept for the last
        few layouts: the closed loop asks for the same one every time, and building it costs a tenth of the
        model's time on a CPU."""
        key = f"{h}x{w}@{pixel_size_nm}:{dtype}:{device}"
        if key in self._layouts:
            return self._layouts[key]
        wy = torch.hann_window(h, periodic=False, dtype=dtype, device=device)
        wx = torch.hann_window(w, periodic=False, dtype=dtype, device=device)
        win = wy.unsqueeze(1) * wx.unsqueeze(0)
        idx = self.bin_index(h, w, pixel_size_nm, device)
        nb = self.n_r * self.n_theta + 1
        counts = torch.zeros(nb, dtype=dtype, device=device)
        counts.index_add_(0, idx, torch.ones_like(idx, dtype=dtype))
        # the window's norm applied to the binned map, not to every frequency
        norm = counts[:-1].clamp(min=1.0) * (win * win).sum()
        mask = (counts[:-1] > 0).to(dtype)
        return self._keep(key, [win, idx, norm, mask])

    def mirror_groups(self, h: int, w: int, pixel_size_nm: float, dtype: torch.dtype,
                      device: torch.device) -> List[torch.Tensor]:
        """[group index, group -> bin, group -> mirrored bin] for ``forward_mirrored``, kept as ``layout`` is.

        Mirrored left to right a patch's power spectrum is P(kx, -ky): a permutation of the rows of the rfft
        layout, so each frequency also has a bin "once mirrored". Frequencies grouped by the pair (bin, mirrored
        bin) give both maps from one pass over the spectrum (a second transform would cost as much as the first;
        permuting angular bins instead is not exact on the axes)."""
        key = f"{h}x{w}@{pixel_size_nm}:{dtype}:{device}:mirror"
        if key in self._layouts:
            return self._layouts[key]
        idx = self.layout(h, w, pixel_size_nm, dtype, device)[1]
        nb = self.n_r * self.n_theta + 1
        idx_m = idx.reshape(h, -1)[torch.remainder(-torch.arange(h, device=device), h)].reshape(-1)
        pairs, groups = torch.unique(idx * nb + idx_m, return_inverse=True)
        to_bins = F.one_hot(torch.div(pairs, nb, rounding_mode="floor"), nb).to(dtype)
        to_mirrored = F.one_hot(torch.remainder(pairs, nb), nb).to(dtype)
        return self._keep(key, [groups, to_bins, to_mirrored])

    def _keep(self, key: str, value: List[torch.Tensor]) -> List[torch.Tensor]:
        if len(self._layouts) >= self.max_layouts:
            # training passes a new pixel size with every sample
            self._layouts.clear()
        self._layouts[key] = value
        return value

    def _power(self, x: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
        """(B * C, H * (W // 2 + 1)) windowed power spectra."""
        b, c, h, w = x.shape
        # in place on the one fresh copy: on a CPU these full-size passes cost more than the FFT itself
        x = x - x.mean(dim=(2, 3), keepdim=True)
        x.mul_(win)
        spec = torch.fft.rfft2(x)
        power = spec.real * spec.real + spec.imag * spec.imag
        return power.reshape(b * c, -1)

    def _map(self, sums: torch.Tensor, norm: torch.Tensor, mask: torch.Tensor, b: int, c: int) -> torch.Tensor:
        """Per-bin power sums (B * C, bins + 1) -> the (B, 3, n_r, n_theta) map."""
        mean = sums[:, :-1] / norm
        logp = torch.log(mean + 1e-12).reshape(b, c, self.n_r * self.n_theta)
        ratio = (logp[:, 1] - logp[:, 0]).clamp(-12.0, 12.0) * mask
        level = 0.5 * (logp[:, 0] + logp[:, 1])
        # gain and contrast only shift the log power: remove that shift per sample
        ref = (level * mask).sum(dim=1, keepdim=True) / mask.sum().clamp(min=1.0)
        level = ((level - ref) * mask).clamp(-20.0, 20.0)
        m = mask.unsqueeze(0).expand(b, mask.shape[0])
        out = torch.stack([ratio, 0.25 * level, m], dim=1)
        return out.reshape(b, 3, self.n_r, self.n_theta)

    def forward(self, x: torch.Tensor, pixel_size_nm: float) -> torch.Tensor:
        b, c, h, w = x.shape
        win, idx, norm, mask = self.layout(h, w, pixel_size_nm, x.dtype, x.device)
        sums = torch.zeros(b * c, self.n_r * self.n_theta + 1, dtype=x.dtype, device=x.device)
        sums.index_add_(1, idx, self._power(x, win))
        return self._map(sums, norm, mask, b, c)

    @torch.jit.export
    def forward_mirrored(self, x: torch.Tensor, pixel_size_nm: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """The maps of the pairs and of the same pairs mirrored left to right, from one transform."""
        b, c, h, w = x.shape
        win, idx, norm, mask = self.layout(h, w, pixel_size_nm, x.dtype, x.device)
        groups, to_bins, to_mirrored = self.mirror_groups(h, w, pixel_size_nm, x.dtype, x.device)
        sums = torch.zeros(b * c, to_bins.shape[0], dtype=x.dtype, device=x.device)
        sums.index_add_(1, groups, self._power(x, win))
        return self._map(sums @ to_bins, norm, mask, b, c), self._map(sums @ to_mirrored, norm, mask, b, c)


_BANDS: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _bands(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = (h, w)
    if key not in _BANDS:
        fy = torch.fft.fftfreq(h).abs().unsqueeze(1)
        fx = torch.fft.rfftfreq(w).unsqueeze(0)
        f = torch.sqrt(fx * fx + fy * fy)
        low = ((f > 0) & (f < 0.08)).float()
        high = (f > 0.4).float()
        _BANDS[key] = (low / low.sum(), high / high.sum())
    return _BANDS[key]


def structure_ratio(patch: torch.Tensor, without_line_column: torch.Tensor | None = None) -> torch.Tensor:
    """Low- over high-frequency power of (N, H, W) patches: about 1 for white noise or a constant image.

    ``without_line_column`` (N,) bool: for these patches the fx = 0 column is left out of the low band. Per-line
    brightness offsets put power there alone, and after ``deepfocus.line_offsets`` their smooth remainder made blank
    ground pass for structure. Only for patches that had offsets: a horizontal edge between tissue and blank
    ground also lives there, and leaving it out everywhere lost such patches on frames three quarters blank."""
    n, h, w = patch.shape
    x = patch - patch.mean(dim=(1, 2), keepdim=True)
    spec = torch.fft.rfft2(x)
    power = spec.real * spec.real + spec.imag * spec.imag
    low, high = _bands(h, w)
    lo = (power * low).sum(dim=(1, 2))
    if without_line_column is not None and bool(without_line_column.any()):
        lo = lo - (power[:, :, 0] * low[:, 0]).sum(dim=1) * without_line_column.to(lo.dtype)
    hi = (power * high).sum(dim=(1, 2))
    return lo / hi.clamp(min=1e-20)


def with_level_anisotropy(feats: torch.Tensor, max_log_amplitude: float, share: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """(G, N, 3, n_r, n_theta) maps of G groups (one field each) with an oriented specimen's anisotropy added to
    the level channel of a ``share`` of the groups: log power + a cos 2 (theta - phi), ``a`` drawn within
    0..``max_log_amplitude`` (natural log) and ``phi`` uniformly, one draw per group. Training augmentation.

    An oriented specimen multiplies both frames' power by the same factor at each frequency: the ratio keeps
    nothing of it (at high dose: measured in models/README.md, "Oriented tissue"), the level all of it, which far
    from focus passes for astigmatism. Added to the cached maps, the anisotropy costs no rendering and can be drawn
    anew every time a group is used. It is tapered away over the rings where the level is within one natural log
    of its lowest (the noise floor, which the specimen does not shape)."""
    g, n, _, n_r, n_t = feats.shape
    out = feats.clone()
    pick = torch.rand(g, generator=generator) < share
    if not bool(pick.any()):
        return out
    k = int(pick.sum())
    amp = torch.rand(k, generator=generator) * max_log_amplitude
    phi = torch.rand(k, generator=generator) * math.pi
    theta = (torch.arange(n_t, dtype=feats.dtype) + 0.5) / n_t * math.pi
    pattern = amp[:, None] * torch.cos(2.0 * (theta[None, :] - phi[:, None]))          # (k, n_t)
    level, mask = out[pick, :, 1], out[pick, :, 2]                                      # (k, n, n_r, n_t)
    # the map holds 0.25 x the level in natural log, relative to its masked mean
    ring = (level * mask).sum(-1) / mask.sum(-1).clamp(min=1.0) / 0.25                  # (k, n, n_r)
    floor = torch.where(mask.sum(-1) > 0, ring, torch.full_like(ring, float("inf"))).min(dim=-1, keepdim=True).values
    taper = (ring - floor).clamp(0.0, 1.0)
    out[pick, :, 1] = level + 0.25 * taper[..., None] * pattern[:, None, None, :] * mask
    return out
