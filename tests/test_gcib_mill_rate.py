"""Mill-rate and dose models: the thesis table, interpolation, Simpson charge, energy density, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gcib.mill_rate import (SCHUBERT2022_CORGON18, MillRateModel, energy_density_j_per_m3, ev_per_cm3_to_j_per_m3,
                            integrated_charge_c, irradiation_energy_density_j_per_m3, irradiation_time_s,
                            j_per_m3_to_ev_per_cm3)
from hardware.errors import LimitError

# Table 2.1 as printed: dose (1e27 eV/cm^3) -> volume rate (um^3/s), volume per charge (1e-8 m^3/C)
PRINTED = [(1.0, 565, 1.487), (0.5, 740, 1.948), (0.25, 1233, 3.246), (0.0, 2072, 5.453)]


def dose(x_1e27: float) -> float:
    return ev_per_cm3_to_j_per_m3(x_1e27 * 1e27)


def test_unit_conversion():
    # 1 eV/cm^3 = 1.602e-19 J / 1e-6 m^3
    assert ev_per_cm3_to_j_per_m3(1e27) == pytest.approx(1.602176634e14, rel=1e-12)
    assert j_per_m3_to_ev_per_cm3(ev_per_cm3_to_j_per_m3(3.3e26)) == pytest.approx(3.3e26, rel=1e-12)


def test_raw_table_columns_give_printed_rates():
    rows = sorted(SCHUBERT2022_CORGON18.rows, key=lambda r: -r.dose_j_per_m3)
    per_charge = SCHUBERT2022_CORGON18.volume_per_charge_m3_per_c()[::-1]
    for row, q, (d, v_um3_s, v_per_c) in zip(rows, per_charge, PRINTED):
        assert row.dose_j_per_m3 == pytest.approx(dose(d))
        assert row.volume_rate_m3_per_s * 1e18 == pytest.approx(v_um3_s, rel=2e-3)
        assert q * 1e8 == pytest.approx(v_per_c, rel=2e-3)


@pytest.mark.parametrize("d, v_um3_s, v_per_c", PRINTED)
def test_model_reproduces_table_at_its_doses(d, v_um3_s, v_per_c):
    model = MillRateModel()
    assert model.volume_per_charge_m3_per_c(dose(d)) * 1e8 == pytest.approx(v_per_c, rel=2e-3)
    assert model.volume_rate_m3_per_s(dose(d), 38e-9) * 1e18 == pytest.approx(v_um3_s, rel=2e-3)


def test_table_mill_time_is_recovered():
    # 200 nm over the 9462 um field at 1e27 eV/cm^3 took 31680 s at 38 nA
    model = MillRateModel()
    t = model.mill_time_s(200e-9, dose(1.0), 38e-9, (9462e-6) ** 2)
    assert t == pytest.approx(31680, rel=2e-3)


def test_interpolation_is_monotone_positive_and_bounded_by_neighbours():
    model = MillRateModel()
    doses = np.linspace(0, dose(1.0), 401)
    rates = np.array([model.volume_per_charge_m3_per_c(d) for d in doses])
    assert np.all(rates > 0)
    assert np.all(np.diff(rates) <= 1e-20)
    # between 0.25 and 0.5 the curve stays within the two measured values (no overshoot)
    inside = (doses > dose(0.25)) & (doses < dose(0.5))
    assert np.all((rates[inside] < 3.246e-8) & (rates[inside] > 1.948e-8))


@settings(max_examples=50, deadline=None)
@given(d=st.floats(0.0, 1.0), current_na=st.floats(1.0, 100.0), edge_mm=st.floats(1.0, 25.0),
       depth_nm=st.floats(1.0, 1000.0))
def test_depth_rate_and_mill_time_scale_with_current_and_area(d, current_na, edge_mm, depth_nm):
    model = MillRateModel()
    area = (edge_mm * 1e-3) ** 2
    v = model.volume_rate_m3_per_s(dose(d), current_na * 1e-9)
    assert model.volume_rate_m3_per_s(dose(d), 2 * current_na * 1e-9) == pytest.approx(2 * v)
    rate = model.depth_rate_m_per_s(dose(d), current_na * 1e-9, area)
    assert rate == pytest.approx(v / area)
    t = model.mill_time_s(depth_nm * 1e-9, dose(d), current_na * 1e-9, area)
    assert t * rate == pytest.approx(depth_nm * 1e-9)


def test_dose_beyond_table_is_refused_with_the_limit_named():
    model = MillRateModel()
    with pytest.raises(LimitError, match="not extrapolated") as err:
        model.volume_per_charge_m3_per_c(dose(1.2))
    assert err.value.high == pytest.approx(dose(1.0))
    held = MillRateModel(max_extrapolation_j_per_m3=dose(0.5))
    assert held.volume_per_charge_m3_per_c(dose(1.2)) == pytest.approx(model.volume_per_charge_m3_per_c(dose(1.0)))
    with pytest.raises(LimitError):
        held.volume_per_charge_m3_per_c(dose(1.6))


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_dose_is_refused(bad):
    with pytest.raises(LimitError, match="irradiation dose"):
        MillRateModel().volume_per_charge_m3_per_c(bad)


def test_bad_current_area_depth_are_refused():
    model = MillRateModel()
    with pytest.raises(LimitError, match="ion beam current"):
        model.volume_rate_m3_per_s(0.0, 0.0)
    with pytest.raises(LimitError, match="milled area"):
        model.depth_rate_m_per_s(0.0, 38e-9, -1.0)
    with pytest.raises(LimitError, match="mill depth"):
        model.mill_time_s(-5e-9, 0.0, 38e-9, 1e-4)


# ----------------------------------------------------------------------------- charge and dose
def test_simpson_charge_of_a_known_trace():
    # a drifting, oscillating source sampled once per second for 10 minutes
    t = np.arange(0.0, 601.0)
    i0, drift, amp, w = 2e-6, 1e-9, 0.2e-6, 2 * np.pi / 120.0
    current = i0 + drift * t + amp * np.sin(w * t)
    exact = i0 * 600 + drift * 600 ** 2 / 2 + amp * (1 - np.cos(w * 600)) / w
    assert integrated_charge_c(t, current) == pytest.approx(exact, rel=1e-6)
    # an electron current read with the opposite sign carries the same charge
    assert integrated_charge_c(t, -current) == pytest.approx(exact, rel=1e-6)


def test_simpson_is_exact_for_a_cubic_on_uneven_steps():
    rng = np.random.default_rng(3)
    t = np.sort(np.concatenate([[0.0, 10.0], rng.uniform(0, 10, 41)]))
    current = 1e-6 * (1 + 0.3 * t - 0.02 * t ** 2 + 0.001 * t ** 3)
    exact = 1e-6 * (10 + 0.15 * 100 - 0.02 * 1000 / 3 + 0.001 * 10000 / 4)
    assert integrated_charge_c(t, current) == pytest.approx(exact, rel=1e-3)


def test_energy_density_formula_and_irradiation_time():
    # 1 uA for 1000 s at 5 kV into 1 cm^2 of 500 nm: U q / (A d)
    rho = energy_density_j_per_m3(1e-3, 5e3, 1e-4, 500e-9)
    assert rho == pytest.approx(5e3 * 1e-3 / (1e-4 * 500e-9))
    t = np.linspace(0, 1000, 1001)
    assert irradiation_energy_density_j_per_m3(t, np.full_like(t, 1e-6), 5e3, 1e-4, 500e-9) == pytest.approx(rho)
    assert irradiation_time_s(rho, 1e-6, 5e3, 1e-4, 500e-9) == pytest.approx(1000.0)
    # reaching 1e27 eV/cm^3 in a 200 nm section at 3 kV needs U q = rho A d
    target = dose(1.0)
    q_needed = target * 1e-4 * 200e-9 / 3e3
    assert irradiation_time_s(target, 1e-6, 3e3, 1e-4, 200e-9) == pytest.approx(q_needed / 1e-6)


@pytest.mark.parametrize("times, currents, message", [
    ([0, 1, 2], [1e-6, 1e-6], "equal length"),
    ([0], [1e-6], "at least 2"),
    ([0, 2, 1], [1e-6] * 3, "increase strictly"),
    ([0, 1, 2], [1e-6, float("nan"), 1e-6], "NaN"),
])
def test_bad_current_samples_are_refused(times, currents, message):
    with pytest.raises(ValueError, match=message):
        integrated_charge_c(times, currents)


def test_bad_irradiation_geometry_is_refused():
    with pytest.raises(LimitError, match="section thickness"):
        energy_density_j_per_m3(1e-3, 5e3, 1e-4, 0.0)
    with pytest.raises(LimitError, match="milled area"):
        energy_density_j_per_m3(1e-3, 5e3, 0.0, 1e-7)
    with pytest.raises(LimitError, match="irradiation current"):
        irradiation_time_s(1e14, 0.0, 5e3, 1e-4, 1e-7)
    assert math.isfinite(irradiation_time_s(0.0, 1e-6, 5e3, 1e-4, 1e-7))


def test_mill_time_command(capsys):
    from acquisition.cli import main

    # 200 nm at 0.25e27 eV/cm^3 over the 7885 um field took 10080 s in the thesis
    assert main(["mill-time", "--depth-nm", "200", "--dose-ev-per-cm3", "2.5e26", "--field-mm", "7.885", "7.885",
                 "--json"]) == 0
    import json
    d = json.loads(capsys.readouterr().out)
    assert d["mill_time_s"] == pytest.approx(10080, rel=2e-3)
    assert main(["mill-time", "--depth-nm", "20", "--dose-ev-per-cm3", "-1"]) == 2
    assert "irradiation dose" in capsys.readouterr().err
