"""The daemon as a separate process: command line, signals, idle CPU, structured logs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from deepfocus.client import DeepFocusClient

try:
    from test_service_estimator import image_pair
except ImportError:
    from tests.test_service_estimator import image_pair

pytestmark = pytest.mark.timeout(60)

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


class Daemon:
    """``python -m deepfocus.service serve`` in a child process, with the test estimator."""

    def __init__(self, bind: str = "tcp://127.0.0.1:0", extra: tuple[str, ...] = (),
                 estimator: str | None = "test_service_estimator:PowerRatioEstimator"):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS_DIR),
                                             env.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-m", "deepfocus.service", "serve", "--bind", bind,
               "--device", "cpu", *extra]
        if estimator:
            cmd += ["--estimator", estimator]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, cwd=REPO, text=True)
        self.logs: list[dict] = []
        self.address = self._wait_serving()

    def _wait_serving(self, timeout_s: float = 20.0) -> str:
        # Logs are read continuously: a full pipe would block the daemon's logging.
        self._serving = threading.Event()
        self._reader = threading.Thread(target=self._read_logs, daemon=True)
        self._reader.start()
        if not self._serving.wait(timeout_s):
            raise TimeoutError(f"daemon did not report 'serving' (exit code {self.proc.poll()})")
        return self._address

    def _read_logs(self) -> None:
        for line in self.proc.stderr:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = {"msg": "non-json", "line": line}
            self.logs.append(rec)
            if rec.get("msg") == "serving":
                self._address = rec["address"]
                self._serving.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def terminate(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._reader.join(5.0)
        self.proc.stderr.close()
        self.proc.stdout.close()
        return rc

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc) -> None:
        self.terminate(signal.SIGKILL if exc[0] else signal.SIGTERM)


def run_cli(*args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "deepfocus.service", *args], capture_output=True,
                          text=True, timeout=timeout_s, env=env, cwd=REPO)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_cleanly_with_json_logs(sig):
    d = Daemon()
    with DeepFocusClient(d.address, timeout_s=5) as c:
        assert c.health()["status"] == "ok"
    t0 = time.monotonic()
    rc = d.terminate(sig)
    assert rc == 0 and time.monotonic() - t0 < 3.0
    msgs = [r["msg"] for r in d.logs]
    assert msgs[-2:] == ["signal received, shutting down", "stopped"]
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in d.logs)


def test_idle_daemon_uses_almost_no_cpu():
    with Daemon() as d:
        with DeepFocusClient(d.address, timeout_s=5) as c:
            c.health()
        time.sleep(0.5)
        before = d.cpu_s()
        time.sleep(2.5)
        used = d.cpu_s() - before
    # a few wake-ups per second to notice signals; far below 1 % of a core
    assert used < 0.025, f"idle daemon used {used:.3f} s CPU in 2.5 s"


def test_ping_and_predict_through_the_command_line(tmp_path):
    minus, plus = image_pair(-5.0, seed=2)
    np.save(tmp_path / "m.npy", minus)
    import tifffile

    tifffile.imwrite(tmp_path / "p.tif", plus)
    with Daemon() as d:
        ping = run_cli("ping", "--connect", d.address, "--json")
        assert ping.returncode == 0, ping.stderr
        assert json.loads(ping.stdout)["status"] == "ok"
        out = run_cli("predict", str(tmp_path / "m.npy"), str(tmp_path / "p.tif"),
                      "--pixel-size-nm", "10", "--perturbation-um", "5", "--json",
                      "--connect", d.address, "--timeout-s", "20")
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["wd_um"] == pytest.approx(5.0, abs=1.5)
        assert {"stig_x", "stig_y", "uncertainty_wd_um", "uncertainty_stig"} <= set(result)
        # the beam the answer assumes, as the local predict prints it (none: this estimator has no beam model)
        assert "aperture_angle_mrad" in result and result["aperture_angle_mrad"] is None
        # files that record their wd: a pair further apart than the daemon's own pair is answered with a note
        for name, frame, wd_mm in (("zm.tif", minus, 4.492), ("zp.tif", plus, 4.508)):
            tifffile.imwrite(tmp_path / name, frame,
                             extratags=[(34118, "s", 0, f"AP_WD\r\nWD = {wd_mm} mm\r\n", False)])
        noted = run_cli("predict", str(tmp_path / "zm.tif"), str(tmp_path / "zp.tif"), "--pixel-size-nm", "10",
                        "--connect", d.address, "--timeout-s", "20")
        assert noted.returncode == 0 and "a pair at wd -/+ 8 um, taken here as -/+ 5 um" in noted.stderr
        bad = run_cli("predict", str(tmp_path / "m.npy"), str(tmp_path / "missing.tif"),
                      "--pixel-size-nm", "10", "--connect", d.address)
        assert bad.returncode == 4 and "missing.tif" in bad.stderr


def test_ping_exits_nonzero_with_clear_message_when_nobody_answers(tmp_path):
    addr = f"ipc://{tmp_path}/nobody.sock"
    out = run_cli("ping", "--connect", addr, "--timeout-s", "0.3", "--retries", "1")
    assert out.returncode == 2
    assert f"DeepFocus daemon at {addr} is not answering" in out.stderr


def test_serve_refuses_open_address_without_keys():
    out = run_cli("serve", "--bind", "tcp://0.0.0.0:0", "--device", "cpu")
    assert out.returncode == 4 and "requires CURVE keys" in out.stderr


def test_serve_refuses_a_patch_count_below_three():
    out = run_cli("serve", "--bind", "tcp://127.0.0.1:0", "--device", "cpu", "--patches", "2")
    assert out.returncode == 4 and "--patches must be at least 3" in out.stderr
