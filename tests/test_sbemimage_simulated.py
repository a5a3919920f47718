"""The SBEMimage plug-in as a facility runs it: SBEMimage's SEM calls on the simulated microscope, the daemon serving
the shipped model for that microscope's profile, frames saved as TIFF files and read back."""
from __future__ import annotations

import pytest
import tifffile

from deepfocus.model_files import load_estimator_for
from deepfocus.sbemimage import DeepFocusSettings, run_deepfocus_af
from hardware.config import load_profile
from hardware.factory import open_microscope

try:
    from test_sbemimage_autofocus import serving
except ImportError:
    from tests.test_sbemimage_autofocus import serving

pytestmark = pytest.mark.timeout(120)


class SimulatedSBEMimageSEM:
    """SBEMimage's SEM API (wd in m, its stigmator values, frame settings by store-resolution index, nm and us) on
    the simulated microscope; a refused setting returns False, as SBEMimage's SEM classes do."""

    STORE_RES = [(1024, 768), (512, 384), (2048, 1536), (768, 576)]
    DWELL_TIME = [0.05, 0.1, 0.2, 0.4, 0.8]

    def __init__(self, scope):
        self.scope, self.sem = scope, scope.sem
        self.error_info = ""
        self.frames = 0

    def get_wd(self) -> float:
        return self.sem.get_wd_m()

    def set_wd(self, target_wd: float) -> bool:
        self.sem.set_wd_m(float(target_wd))
        return True

    def get_stig_xy(self) -> tuple[float, float]:
        return tuple(self.sem.get_stig())

    def set_stig_xy(self, target_stig_x: float, target_stig_y: float) -> bool:
        self.sem.set_stig(float(target_stig_x), float(target_stig_y))
        return True

    def apply_frame_settings(self, frame_size_selector: int, pixel_size: float, dwell_time: float) -> bool:
        width, height = self.STORE_RES[frame_size_selector]
        self.sem.set_scan(pixel_size_m=pixel_size * 1e-9, width_px=width, height_px=height, dwell_s=dwell_time * 1e-6)
        return True

    def acquire_frame(self, save_path_filename: str, extra_delay: float = 0) -> bool:
        tifffile.imwrite(save_path_filename, self.sem.grab_frame().image)
        self.frames += 1
        return True

    def truth(self) -> tuple[float, float, float]:
        """(defocus um, stigmator errors in units) of the simulated column."""
        sim = self.scope.sim
        sx, sy = self.sem.get_stig()
        cx, cy = sim.true_stig()
        return (self.sem.get_wd_m() - sim.true_wd_m()) * 1e6, sx - cx, sy - cy


def shipped_model_daemon(profile: str, overrides: list[str]):
    """The daemon on a free loopback port serving the shipped model for ``profile``, as
    ``deepfocus serve --profile PROFILE --set ...`` does; a context giving its address."""
    return serving(load_estimator_for(load_profile(profile, overrides), device="cpu"))


WIDE_BEAM = ["optics.aperture_angle_mrad=10.8", "calibration.aperture_angle_mrad=10.8"]


# near focus as between neighbouring sections; twice the model's trained range (34 um at +-5 um) away; a wide beam
# on small frames, whose far pair at 15 um would bin them past a patch (the daemon refused that pair, and the run
# ended there with an error)
@pytest.mark.parametrize("overrides, selector, pixel_nm, start_um, start_stig", [
    ([], None, 10.0, 12.0, (1.5, -1.0)),
    ([], None, 10.0, -70.0, (-2.0, 2.5)),
    (WIDE_BEAM, 3, 7.1, 45.0, (2.0, -2.0)),
])
def test_the_plugin_focuses_and_stigmates_the_simulated_microscope_with_the_shipped_model(overrides, selector,
                                                                                          pixel_nm, start_um,
                                                                                          start_stig):
    scope = open_microscope("setup_a", ["seed=3", *overrides])
    sem = SimulatedSBEMimageSEM(scope)
    cx, cy = scope.sim.true_stig()
    sem.set_wd(scope.sim.true_wd_m() + start_um * 1e-6)
    sem.set_stig_xy(cx + start_stig[0], cy + start_stig[1])
    settings = DeepFocusSettings(timeout_s=30, retries=0, settle_s=0.0, dwell_time_us=0.05, max_iterations=5,
                                 frame_size_selector=selector, pixel_size_nm=pixel_nm, wd_tolerance_um=0.6,
                                 stig_tolerance=0.15, max_wd_stig_diff=(90e-6, 4.0, 4.0))
    with shipped_model_daemon("setup_a", overrides) as address:
        settings.address = address
        res = run_deepfocus_af(sem, settings)
    assert res.ok and res.converged, res.message
    wd_um, ex, ey = sem.truth()
    assert abs(wd_um) < 1.0 and max(abs(ex), abs(ey)) < 0.25          # the thesis' margin
    # the focus frames: the selector's (by default the SEM's own 1024 x 768) at the settings' pixel size and dwell
    scan = sem.sem.get_scan()
    assert (scan.width_px, scan.height_px) == sem.STORE_RES[selector or 0]
    assert scan.pixel_size_m == pytest.approx(pixel_nm * 1e-9) and scan.dwell_s == pytest.approx(50e-9)
    assert len(res.iterations) <= 5
    if overrides:       # the far pair was taken as far apart as the daemon's model answers on these frames
        assert any(it.far for it in res.iterations)
