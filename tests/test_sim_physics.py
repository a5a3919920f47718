"""Physics of the simulated SEM, checked with numbers against the model in DESIGN.md."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special

from hardware.factory import open_microscope
from hardware.sim.series import set_relative_aberration
from hardware.sim.specimen import Specimen

QUIET = ["beam.current_na=2000", "detector.read_noise=0", "detector.line_jitter_px=0",
         "drift.rate_nm_per_s=0", "drift.random_walk_nm_per_sqrt_s=0", "detector.brightness_drift=0"]


def quiet_scope(*extra, specimen=None):
    """A microscope whose noise and drift are negligible, so blur alone changes the image."""
    return open_microscope("setup_a", QUIET + list(extra), specimen=specimen)


def grab(scope, z_um, stig=(0.0, 0.0), size=256, px_nm=10.0):
    scope.sem.set_scan(pixel_size_m=px_nm * 1e-9, width_px=size, height_px=size, dwell_s=200e-9)
    set_relative_aberration(scope, z_um, stig)
    f = scope.sem.grab_frame()
    return f.image.astype(np.float64), f.metadata["truth"]


def sharpness(img):
    gy, gx = np.gradient(img)
    return float(np.mean(gx * gx + gy * gy) / img.var())


def test_blur_grows_monotonically_with_defocus_and_is_symmetric_in_sign():
    scope = quiet_scope()
    zs = [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    plus = [sharpness(grab(scope, z)[0]) for z in zs]
    minus = [sharpness(grab(scope, -z)[0]) for z in zs]
    assert all(a > b for a, b in zip(plus, plus[1:])), plus
    assert all(a > b for a, b in zip(minus, minus[1:])), minus
    for z, p, m in zip(zs[2:], plus[2:], minus[2:]):
        assert p == pytest.approx(m, rel=0.05), f"asymmetric blur at +-{z} um: {p} vs {m}"


def blur_direction_deg(img, reference, k_max_rad_per_px=0.35):
    """Direction (image frame, x right, y down) of the spot's long axis, from the transfer function.

    At low frequency -log(P_img / P_ref) ~ (alpha^2 / 4) k^T M^2 k; fitting that
    quadratic form and taking its major eigenvector gives the line focus,
    independent of the specimen's own anisotropy (which cancels in the ratio).
    """
    p1 = np.abs(np.fft.fft2(img - img.mean())) ** 2
    p0 = np.abs(np.fft.fft2(reference - reference.mean())) ** 2
    kx, ky = np.meshgrid(2 * np.pi * np.fft.fftfreq(img.shape[1]), 2 * np.pi * np.fft.fftfreq(img.shape[0]))
    k = np.hypot(kx, ky)
    sel = (k > 0.03) & (k < k_max_rad_per_px)
    y = -np.log(p1[sel] / p0[sel])
    a = np.stack([kx[sel] ** 2, 2 * kx[sel] * ky[sel], ky[sel] ** 2], axis=1)
    (qa, qb, qc), *_ = np.linalg.lstsq(a, y, rcond=None)
    w, v = np.linalg.eigh(np.array([[qa, qb], [qb, qc]]))
    major = v[:, int(np.argmax(w))]
    return float(np.degrees(np.arctan2(major[1], major[0])) % 180.0)


def angle_diff(a, b):
    return abs((a - b + 90.0) % 180.0 - 90.0)


@pytest.mark.parametrize("rotation_deg", [0.0, 90.0, 50.0])
def test_astigmatism_gives_line_foci_that_rotate_with_the_stigmator(rotation_deg):
    scope = quiet_scope(f"stigmator.rotation_deg={rotation_deg}", "optics.image_rotation_deg_per_mm=0")
    d = 2.0                                     # stigmator units along x
    a_um = d * scope.config.stigmator.scale_um_per_unit
    # astigmatism angle is the stigmator rotation; the line focus lies at half of it
    beta = rotation_deg / 2.0
    ref, _ = grab(scope, 0.0, size=384)
    img, truth = grab(scope, +a_um, (d, 0.0), size=384)
    assert math.hypot(truth["astig_x_um"], truth["astig_y_um"]) == pytest.approx(a_um, rel=1e-3)
    assert angle_diff(blur_direction_deg(img, ref), beta) < 4.0
    img, _ = grab(scope, -a_um, (d, 0.0), size=384)
    assert angle_diff(blur_direction_deg(img, ref), beta + 90.0) < 4.0


def detector_variance(scope, dwell_ns):
    """Grey-level variance on bare wafer (uniform yield) between sections."""
    sec = scope.sim.wafer.sections[0]
    scope.stage.move_to(x_m=sec.center_m[0] + 3.5e-3, y_m=sec.center_m[1])
    assert scope.sim.wafer.section_at(*scope.sim.beam_position_m()) is None
    scope.sem.set_scan(pixel_size_m=10e-9, width_px=256, height_px=256, dwell_s=dwell_ns * 1e-9)
    return float(scope.sem.grab_frame().image.astype(np.float64).var())


@pytest.mark.parametrize("change", [("dwell", 4.0), ("current", 2.0), ("efficiency", 2.5)])
def test_noise_variance_follows_the_dose(change):
    base = ["detector.read_noise=0", "detector.brightness_drift=0", "beam.current_na=1.0", "detector.efficiency=0.1"]
    what, factor = change
    s1 = open_microscope("setup_a", base)
    v1 = detector_variance(s1, 100)
    if what == "dwell":
        v2 = detector_variance(open_microscope("setup_a", base), 100 * factor)
    elif what == "current":
        v2 = detector_variance(open_microscope("setup_a", base + [f"beam.current_na={factor}"]), 100)
    else:
        v2 = detector_variance(open_microscope("setup_a", base + [f"detector.efficiency={0.1 * factor}"]), 100)
    assert v1 / v2 == pytest.approx(factor, rel=0.08)
    # and the absolute level is Poisson statistics of the detected electrons
    d = s1.config.detector
    full = 2 ** d.bit_depth - 1
    counts = 0.1 * 1.0e-9 * 100e-9 / 1.602176634e-19
    expected = (d.gain * full) ** 2 * d.wafer_yield / counts + 1 / 12
    assert v1 == pytest.approx(expected, rel=0.08)


def white_noise_specimen(px_m=10e-9, n=1024, seed=3):
    rng = np.random.default_rng(seed)
    return Specimen(rng.random((1, n, n)).astype(np.float32), px_m, px_m, name="white-noise")


def radial_power(img):
    f = np.abs(np.fft.fft2(img - img.mean())) ** 2
    k = 2 * np.pi * np.hypot(*np.meshgrid(np.fft.fftfreq(img.shape[1]), np.fft.fftfreq(img.shape[0])))
    return f, k  # k in rad/pixel


def ring_means(power, k_rad_per_px, edges):
    idx = np.digitize(k_rad_per_px.ravel(), edges)
    p = power.ravel()
    return np.array([p[idx == i].mean() for i in range(1, len(edges))])


def test_defocus_transfer_is_the_uniform_disc_jinc():
    spec = white_noise_specimen()
    overrides = ["optics.image_rotation_deg_per_mm=0", "optics.image_scale_per_mm=0"]
    scope = quiet_scope(*overrides, specimen=spec)
    z_um = 5.0
    alpha = scope.config.optics.aperture_angle_mrad * 1e-3
    ref, _ = grab(scope, 0.0, size=512)
    img, truth = grab(scope, z_um, size=512)
    assert truth["defocus_um"] == pytest.approx(z_um, abs=1e-6)
    p0, k = radial_power(ref)
    p1, _ = radial_power(img)
    p_m = 10e-9
    edges = np.linspace(0.3, 3.0, 12) / (alpha * z_um * 1e-6) * p_m  # u from 0.3 to 3.0, in rad/px
    measured = ring_means(p1, k, edges) / ring_means(p0, k, edges)
    centers_u = 0.5 * (edges[1:] + edges[:-1]) / p_m * alpha * z_um * 1e-6
    expected = (2 * special.j1(centers_u) / centers_u) ** 2
    np.testing.assert_allclose(measured, expected, rtol=0.12, atol=0.01)


def test_in_focus_floor_is_gaussian_with_the_profile_fwhm():
    spec = white_noise_specimen()
    base = ["optics.image_rotation_deg_per_mm=0", "optics.image_scale_per_mm=0"]
    narrow = quiet_scope(*base, "optics.in_focus_probe_nm=1", specimen=spec)
    wide = quiet_scope(*base, "optics.in_focus_probe_nm=25", specimen=spec)
    a, _ = grab(narrow, 0.0, size=512)
    b, _ = grab(wide, 0.0, size=512)
    pa, k = radial_power(a)
    pb, _ = radial_power(b)
    edges = np.linspace(0.2, 1.5, 10)  # rad/px
    measured = ring_means(pb, k, edges) / ring_means(pa, k, edges)
    kc = 0.5 * (edges[1:] + edges[:-1]) / 10e-9
    s1, s2 = 1e-9 / 2.3548, 25e-9 / 2.3548
    expected = np.exp(-(s2 ** 2 - s1 ** 2) * kc ** 2)   # power ratio: square of the amplitude ratio
    np.testing.assert_allclose(measured, expected, rtol=0.12, atol=0.005)


def test_same_profile_and_seed_give_the_same_frames_with_independent_noise():
    a = open_microscope("setup_a")
    b = open_microscope("setup_a")
    for s in (a, b):
        s.sem.set_scan(pixel_size_m=10e-9, width_px=128, height_px=96, dwell_s=100e-9)
    fa = [a.sem.grab_frame().image for _ in range(3)]
    fb = [b.sem.grab_frame().image for _ in range(3)]
    for x, y in zip(fa, fb):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(fa[0], fa[1])
    c = open_microscope("setup_a", ["seed=7"])
    c.sem.set_scan(pixel_size_m=10e-9, width_px=128, height_px=96, dwell_s=100e-9)
    assert not np.array_equal(c.sem.grab_frame().image, fa[0])


def test_long_stage_moves_change_best_focus_at_the_same_place():
    scope = open_microscope("setup_a")
    home = scope.sim.wafer.sections[0].center_m
    wds = []
    for _ in range(12):
        scope.stage.move_to(x_m=home[0] + 30e-3, y_m=home[1])
        scope.stage.move_to(x_m=home[0], y_m=home[1])
        wds.append(scope.sim.true_wd_m())
    sd_um = np.std(wds) * 1e6
    z_err = scope.config.stage.z_error_um
    assert 0.3 * z_err < sd_um < 2.5 * z_err


def test_wafer_tilt_and_bow_move_best_focus_between_sections():
    scope = open_microscope("setup_a", ["stage.z_error_um=0"])
    secs = scope.sim.wafer.sections
    wds = []
    for s in (secs[0], secs[len(secs) // 2], secs[-1]):
        scope.stage.move_to(x_m=s.center_m[0], y_m=s.center_m[1])
        wds.append(scope.sim.true_wd_m())
    assert np.ptp(wds) * 1e6 > 2.0   # micrometres across the wafer


def test_milling_moves_focus_and_milled_through_sections_show_bare_wafer():
    scope = quiet_scope()
    sec = scope.sim.wafer.sections[0]
    before = scope.sim.true_wd_m()
    sec.mill(100e-9)
    assert scope.sim.true_wd_m() - before == pytest.approx(100e-9, abs=1e-12)
    tissue, _ = grab(scope, 0.0, size=128)
    sec.mill(sec.thickness_m)
    wafer, _ = grab(scope, 0.0, size=128)
    assert wafer.std() < 0.05 * tissue.std()
    assert wafer.mean() < tissue.mean()


def test_frames_of_real_em_specimens(em_dir):
    from hardware.sim.specimen import load_specimen
    spec = load_specimen(em_dir / "flyem_fib25_8nm_520.ome.tif")
    assert spec.pixel_size_m == pytest.approx(8e-9)
    scope = quiet_scope(specimen=spec)
    sharp, _ = grab(scope, 0.0, size=256)
    blurred, _ = grab(scope, 10.0, size=256)
    assert sharpness(blurred) < 0.5 * sharpness(sharp)


def test_a_specimen_can_keep_only_the_slices_training_left_out(em_dir):
    """``stack.tif[27:32]`` images slices 27-31 (EPFL's validation slices), normalised as the whole stack is."""
    from hardware.errors import ConfigError
    from hardware.sim.specimen import load_specimen
    path = em_dir / "epfl_ca1_fibsem_5nm.ome.tif"
    whole = load_specimen(path)
    held = load_specimen(f"{path}[27:32]")
    assert held.slices.shape[0] == 5 and held.pixel_size_m == whole.pixel_size_m
    np.testing.assert_array_equal(held.slices, whole.slices[27:32])
    # an unmilled section shows the first kept slice, not slice 0 of the volume
    scope = quiet_scope(specimen=held)
    frame, _ = grab(scope, 0.0, size=256)
    other = quiet_scope(specimen=whole)
    assert not np.allclose(frame, grab(other, 0.0, size=256)[0])
    with pytest.raises(ConfigError, match="none of them"):
        load_specimen(f"{path}[40:50]")
    with pytest.raises(ConfigError, match="does not exist"):
        load_specimen(f"{em_dir / 'missing.ome.tif'}[0:2]")


def hankel_otf(u: float, taper: float) -> float:
    """Reference OTF of an aperture filled as exp(-taper rho^2), by adaptive quadrature (not the simulator's table)."""
    from scipy import integrate
    num = integrate.quad(lambda r: math.exp(-taper * r * r) * special.j0(u * r) * r, 0, 1, limit=200)[0]
    den = integrate.quad(lambda r: math.exp(-taper * r * r) * r, 0, 1)[0]
    return num / den


@pytest.mark.parametrize("taper, halo", [(2.5, 0.0), (-2.0, 0.0), (0.0, 0.35)])
def test_unevenly_filled_aperture_transfers_its_hankel_transform(taper, halo):
    """A profile that fills the aperture unevenly (or scatters a halo) blurs by its own transfer function."""
    spec = white_noise_specimen()
    overrides = ["optics.image_rotation_deg_per_mm=0", "optics.image_scale_per_mm=0",
                 f"optics.aperture_taper={taper}", f"optics.halo_fraction={halo}", "optics.halo_width=1.5"]
    scope = quiet_scope(*overrides, specimen=spec)
    z_um = 5.0
    alpha = scope.config.optics.aperture_angle_mrad * 1e-3
    ref, _ = grab(scope, 0.0, size=512)
    img, _ = grab(scope, z_um, size=512)
    p0, k = radial_power(ref)
    p1, _ = radial_power(img)
    p_m = 10e-9
    edges = np.linspace(0.3, 3.0, 12) / (alpha * z_um * 1e-6) * p_m
    measured = ring_means(p1, k, edges) / ring_means(p0, k, edges)
    centers_u = 0.5 * (edges[1:] + edges[:-1]) / p_m * alpha * z_um * 1e-6
    expected = np.array([((1 - halo) * hankel_otf(u, taper) + halo * math.exp(-0.5 * (1.5 * u) ** 2)) ** 2
                         for u in centers_u])
    np.testing.assert_allclose(measured, expected, rtol=0.12, atol=0.01)
    # and it is not the uniform disc's: the check above can tell the profiles apart
    uniform = (2 * special.j1(centers_u) / centers_u) ** 2
    assert np.abs(expected - uniform).max() > 0.05


@pytest.mark.parametrize("key, value", [("optics.aperture_taper", 6), ("optics.halo_fraction", 1.0),
                                        ("optics.halo_fraction", -0.1), ("optics.halo_width", 0.5)])
def test_aperture_profile_beyond_its_range_is_refused(key, value):
    from hardware.config import ConfigError
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        open_microscope("setup_a", [f"{key}={value}"])


@pytest.mark.parametrize("taper, halo", [(0.0, 0.0), (2.5, 0.0), (-2.0, 0.2)])
def test_probe_rms_radius_is_the_second_moment_of_the_rays(taper, halo):
    """The probe size the bench reports a residual error by: rays through the aperture mapped by M, plus the
    in-focus floor, by Monte Carlo."""
    from hardware.sim.optics import FWHM_PER_SIGMA, ApertureProfile, probe_rms_radius_m
    rng = np.random.default_rng(3)
    alpha, floor, z, ax, ay = 4e-3, 3e-9, 2e-6, 1.2e-6, -0.7e-6
    n = 400_000
    rho, phi = np.sqrt(rng.random(n)), rng.random(n) * 2 * np.pi
    theta = alpha * rho[:, None] * np.stack([np.cos(phi), np.sin(phi)], 1)
    weight = np.exp(-taper * rho * rho)
    halo_rays = rng.random(n) < halo
    theta[halo_rays] = rng.normal(0, 1.5 * alpha, (int(halo_rays.sum()), 2))
    weight[halo_rays] = 1.0
    # the taper reweights the disc rays only: keep their share of the current at 1 - halo
    disc = ~halo_rays
    weight[disc] *= disc.sum() / weight[disc].sum()
    m = np.array([[z + ax, ay], [ay, z - ax]])
    r = theta @ m.T
    sigma = floor / FWHM_PER_SIGMA
    expected = math.sqrt(np.average((r * r).sum(1), weights=weight) + 2 * sigma * sigma)
    got = probe_rms_radius_m(z, (ax, ay), alpha, floor, ApertureProfile(taper, halo, 1.5))
    assert got == pytest.approx(expected, rel=0.01)


def test_probe_rms_radius_matches_the_rendered_probe():
    from hardware.sim.optics import apply_probe, probe_rms_radius_m
    n, p = 512, 1e-9
    point = np.zeros((n, n), np.float32)
    point[n // 2, n // 2] = 1.0
    psf = apply_probe(point, p, 3e-6, (1.5e-6, -1e-6), 4e-3, 3e-9).astype(np.float64)
    yy, xx = np.mgrid[:n, :n]
    rms = math.sqrt((psf * ((yy - n // 2) ** 2 + (xx - n // 2) ** 2)).sum() / psf.sum()) * p
    assert probe_rms_radius_m(3e-6, (1.5e-6, -1e-6), 4e-3, 3e-9) == pytest.approx(rms, rel=0.005)
