"""runtime.jetson: tegrastats parsing on real-format lines, the sampler, nvpmodel and devfreq.

Parsing covers Orin and Xavier/Nano; the sampler runs a fake
tegrastats on PATH, nvpmodel and devfreq parsing.
"""

from __future__ import annotations

import os
import stat
import time

import pytest

from lowrank_core.errors import RuntimeUnavailableError, UserInputError
from runtime import jetson

# AGX Orin, Jetson Linux r35/r36 (rails with mW units; GR3D_FREQ with one frequency per GPC).
ORIN_AGX = (
    "11-21-2025 10:15:02 RAM 2448/62804MB (lfb 14346x4MB) SWAP 0/31402MB (cached 0MB) "
    "CPU [12%@1190,0%@1190,3%@1190,0%@1190,off,off,off,off,0%@1190,0%@1190,0%@1190,0%@1190] "
    "EMC_FREQ 4%@2133 GR3D_FREQ 61%@[1300,1300] VIC_FREQ 729 APE 174 CV0@-256C CPU@45.375C Tboard@32C "
    "SOC2@41.656C Tdiode@34.5C SOC0@41.343C CV1@-256C GPU@44.218C tj@45.375C SOC1@41.562C CV2@-256C "
    "VDD_GPU_SOC 2390mW/2201mW VDD_CPU_CV 797mW/750mW VIN_SYS_5V0 3125mW/3100mW VDDQ_VDD2_1V8AO 402mW/402mW"
)
# Orin Nano / NX, JetPack 6 (one GPC frequency in brackets; VDD_IN / VDD_CPU_GPU_CV / VDD_SOC rails).
ORIN_NANO = (
    "RAM 2005/7620MB (lfb 1x2MB) SWAP 0/3810MB (cached 0MB) CPU [1%@729,0%@729,0%@729,0%@729,0%@729,0%@729] "
    "EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305] NVENC off NVDEC off VIC off APE 200 cpu@47.718C soc2@46.062C "
    "gpu@46.468C tj@47.718C VDD_IN 4479mW/4479mW VDD_CPU_GPU_CV 483mW/483mW VDD_SOC 1410mW/1410mW"
)
# AGX Xavier, L4T 32.x (rails without units: GPU/CPU/SOC/CV/VDDRQ/SYS5V).
XAVIER = (
    "RAM 2896/15827MB (lfb 2623x4MB) SWAP 0/7913MB (cached 0MB) CPU [2%@1190,1%@1190,0%@1190,0%@1190,off,off,off,off] "
    "EMC_FREQ 0%@1600 GR3D_FREQ 35%@318 APE 150 MTS fg 0% bg 0% AO@39.5C GPU@39.5C Tdiode@41.5C PMIC@100C "
    "AUX@38.5C CPU@40C thermal@39.6C Tboard@39C GPU 1234/1100 CPU 310/310 SOC 1241/1241 CV 0/0 VDDRQ 310/310 SYS5V 2139/2139"
)
# Jetson Nano, L4T 32.x (POM_5V_* rails, IRAM field, CPU at 102 MHz).
NANO = (
    "RAM 1712/3956MB (lfb 90x4MB) SWAP 0/1978MB (cached 0MB) IRAM 0/252kB(lfb 252kB) CPU [3%@102,2%@102,0%@102,0%@102] "
    "EMC_FREQ 0%@1600 GR3D_FREQ 0%@76 APE 25 PLL@22C CPU@24.5C PMIC@100C GPU@23C AO@30C thermal@23.5C "
    "POM_5V_IN 1415/1415 POM_5V_GPU 0/0 POM_5V_CPU 123/123"
)


def test_parse_orin_agx():
    s = jetson.parse_tegrastats_line(ORIN_AGX)
    assert (s.ram_used_mb, s.ram_total_mb, s.lfb_blocks, s.lfb_block_mb) == (2448, 62804, 14346, 4)
    assert (s.swap_used_mb, s.swap_total_mb, s.swap_cached_mb) == (0, 31402, 0)
    assert len(s.cpu_load_pct) == 12
    assert s.cpu_load_pct[:5] == [12, 0, 3, 0, None]
    assert s.cpu_freq_mhz[0] == 1190
    assert s.cpu_freq_mhz[4] is None
    assert (s.emc_load_pct, s.emc_freq_mhz) == (4, 2133)
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (61, [1300, 1300])
    assert s.temps_c["CPU"] == 45.375
    assert s.temps_c["GPU"] == 44.218
    assert s.temps_c["Tboard"] == 32.0
    assert "CV0" not in s.temps_c  # -256C = sensor off
    assert s.power_mw == {
        "VDD_GPU_SOC": (2390, 2201),
        "VDD_CPU_CV": (797, 750),
        "VIN_SYS_5V0": (3125, 3100),
        "VDDQ_VDD2_1V8AO": (402, 402),
    }


def test_parse_orin_nano():
    s = jetson.parse_tegrastats_line(ORIN_NANO)
    assert (s.ram_used_mb, s.ram_total_mb, s.lfb_blocks, s.lfb_block_mb) == (2005, 7620, 1, 2)
    assert s.cpu_load_pct == [1, 0, 0, 0, 0, 0]
    assert s.cpu_freq_mhz == [729] * 6
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (0, [305])
    assert s.power_mw == {"VDD_IN": (4479, 4479), "VDD_CPU_GPU_CV": (483, 483), "VDD_SOC": (1410, 1410)}
    assert s.temps_c["gpu"] == 46.468


def test_parse_xavier():
    s = jetson.parse_tegrastats_line(XAVIER)
    assert (s.ram_used_mb, s.ram_total_mb) == (2896, 15827)
    assert s.cpu_load_pct == [2, 1, 0, 0, None, None, None, None]
    assert (s.emc_load_pct, s.emc_freq_mhz) == (0, 1600)
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (35, [318])
    assert s.power_mw == {
        "GPU": (1234, 1100),
        "CPU": (310, 310),
        "SOC": (1241, 1241),
        "CV": (0, 0),
        "VDDRQ": (310, 310),
        "SYS5V": (2139, 2139),
    }
    assert s.temps_c["PMIC"] == 100.0
    assert s.temps_c["thermal"] == 39.6


def test_parse_nano_pom_rails():
    s = jetson.parse_tegrastats_line(NANO)
    assert s.power_mw == {"POM_5V_IN": (1415, 1415), "POM_5V_GPU": (0, 0), "POM_5V_CPU": (123, 123)}
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (0, [76])
    assert s.cpu_freq_mhz == [102] * 4


def test_parse_rejects_other_text():
    with pytest.raises(UserInputError, match="not a tegrastats line"):
        jetson.parse_tegrastats_line("hello world")


def test_summarize_numbers():
    samples = [jetson.parse_tegrastats_line(line) for line in (ORIN_AGX, ORIN_AGX.replace("61%@", "21%@"))]
    summary = jetson.summarize(samples)
    assert summary["samples"] == 2
    assert summary["gpu_load_mean_pct"] == 41.0
    assert summary["gpu_load_max_pct"] == 61
    assert summary["ram_used_peak_mb"] == 2448
    assert summary["gpu_freq_max_mhz"] == 1300
    assert summary["power_mean_mw"]["VDD_GPU_SOC"] == 2390.0
    assert jetson.summarize([]) is None


def _fake_tegrastats(tmp_path, lines):
    script = tmp_path / "tegrastats"
    body = "\n".join(f"echo '{line}'" for line in lines)
    script.write_text(f'#!/bin/sh\n[ "$1" = "--interval" ] || exit 3\n{body}\nwhile true; do sleep 0.05; done\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_sampler_runs_fake_tegrastats_and_stops(tmp_path, monkeypatch):
    _fake_tegrastats(tmp_path, [ORIN_AGX, "garbage line", XAVIER])
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with jetson.TegrastatsSampler(interval_ms=50) as sampler:
        deadline = time.monotonic() + 10
        while len(sampler.samples) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc = sampler._proc
    assert proc is not None
    assert proc.poll() is not None
    summary = sampler.summary()
    assert summary["samples"] == 2
    assert summary["unparsed_lines"] == 1
    assert summary["gpu_load_max_pct"] == 61
    assert summary["ram_used_peak_mb"] == 2896
    assert summary["interval_ms"] == 50


def test_sampler_without_tegrastats(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with jetson.TegrastatsSampler() as sampler:
        pass
    assert sampler.summary() is None
    assert "not found" in sampler.reason
    with pytest.raises(RuntimeUnavailableError, match="not found"), jetson.TegrastatsSampler(required=True):
        pass


def test_nvpmodel_and_clock_state(tmp_path, monkeypatch):
    assert jetson.parse_nvpmodel("NV Power Mode: MAXN\n0\n") == {"name": "MAXN", "id": 0}
    assert jetson.parse_nvpmodel("NVPM WARN: x\nNV Power Mode: 15W\n2\n") == {"name": "15W", "id": 2}
    assert jetson.parse_nvpmodel("nothing") is None
    node = tmp_path / "sys/devices/platform/bus@0/17000000.gpu/devfreq/17000000.gpu"
    node.mkdir(parents=True)
    for key, value in (("min_freq", 1300500000), ("max_freq", 1300500000), ("cur_freq", 1300500000)):
        (node / key).write_text(f"{value}\n")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvpmodel").write_text("#!/bin/sh\necho 'NV Power Mode: MAXN'\necho 0\n")
    (fake / "nvpmodel").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    state = jetson.jetson_state(root=tmp_path)
    assert state["nvpmodel"] == {"name": "MAXN", "id": 0}
    assert state["clocks_maxed"] is True
    assert state["gpu_clocks"]["max_freq"] == 1300500000
    (node / "min_freq").write_text("306000000\n")
    assert jetson.gpu_clock_state(tmp_path)[0]["clocks_maxed"] is False
    empty = jetson.jetson_state(root=tmp_path / "none", nvpmodel="no-such-nvpmodel")
    assert empty["nvpmodel"] is None
    assert "not found" in empty["nvpmodel_reason"]
    assert empty["clocks_maxed"] is None
    assert "devfreq" in empty["clocks_reason"]


@pytest.mark.jetson
def test_real_tegrastats_sampler():
    with jetson.TegrastatsSampler(interval_ms=100, required=True) as sampler:
        time.sleep(0.5)
    summary = sampler.summary()
    assert summary is not None
    assert summary["samples"] >= 1
    assert summary["ram_total_mb"] > 0


# Wiring into `python -m runtime bench` ---------------------------------------------------------------------


def test_bench_sampler_modes(tmp_path):
    assert jetson.bench_sampler(False) is None
    assert jetson.bench_sampler(None, root=tmp_path) is None  # not a Jetson: automatic means off
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.0\n")
    auto = jetson.bench_sampler(None, interval_ms=50, root=tmp_path)
    assert auto is not None
    assert (auto.interval_ms, auto.required) == (50, False)
    assert jetson.bench_sampler(True).required is True


def test_jetson_record_and_markdown():
    sampler = jetson.TegrastatsSampler(interval_ms=100)
    sampler.samples.extend(jetson.parse_tegrastats_line(line) for line in (ORIN_AGX, ORIN_AGX.replace("61%@", "21%@")))
    state = {"nvpmodel": {"name": "MAXN", "id": 0}, "clocks_maxed": True, "gpu_clocks": {}, "clocks_reason": None}
    record = jetson.jetson_record(sampler, state)
    assert record["tegrastats"]["gpu_load_mean_pct"] == 41.0
    assert record["tegrastats"]["emc_freq_max_mhz"] == 2133
    assert record["tegrastats"]["cpu_freq_max_mhz"] == 1190
    assert record["state"] == state
    lines = jetson.jetson_markdown(record)
    assert lines[0].startswith("Power (mean over 2 tegrastats samples, 100 ms): VDD_GPU_SOC 2.39 W, VDD_CPU_CV 0.80 W")
    assert lines[1] == "RAM peak 2448 / 62804 MB; GPU load mean 41.0 %, max 61 %"
    assert lines[2] == "Clocks: GPU 1300–1300 MHz, EMC max 2133 MHz, CPU max 1190 MHz"
    assert lines[3] == "Power mode: MAXN (id 0); GPU clocks pinned at max (jetson_clocks)"
    assert jetson.jetson_record(None) is None
    assert jetson.jetson_markdown(None) == []


def test_bench_cli_samples_fake_tegrastats_into_latency_and_report(tmp_path, run_dir, run_cli, monkeypatch):
    import json

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "tegrastats"
    script.write_text(
        f"#!/bin/sh\n[ \"$1\" = \"--interval\" ] || exit 3\nwhile true; do echo '{XAVIER}'; echo '{ORIN_AGX}'; "
        "sleep 0.02; done\n"
    )
    script.chmod(0o755)
    (bin_dir / "nvpmodel").write_text("#!/bin/sh\necho 'NV Power Mode: 15W'\necho 2\n")
    (bin_dir / "nvpmodel").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = run_cli(
        "bench", "--run-dir", str(run_dir), "--tegrastats", "--tegrastats-interval", "20",
        "--iters", "20", "--warmup", "0", "--warmup-iters", "2", "--threads", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = run_cli("report", "--run-dir", str(run_dir))
    assert report.returncode == 0, report.stderr
    latency = json.loads((run_dir / "latency.json").read_text())
    record = latency["jetson"]
    assert record["tegrastats"]["samples"] >= 1
    assert record["tegrastats"]["interval_ms"] == 20
    assert record["tegrastats"]["ram_total_mb"] in (15827, 62804)
    assert record["state"]["nvpmodel"] == {"name": "15W", "id": 2}
    assert "Jetson: Power mode: 15W (id 2)" in (run_dir / "latency.md").read_text()
    assert "- Jetson: RAM peak" in report.stdout
    assert json.loads((run_dir / "report.json").read_text())["jetson"] == record


def test_bench_cli_requires_tegrastats_when_asked(run_dir, run_cli, tmp_path):
    proc = run_cli("bench", "--run-dir", str(run_dir), "--tegrastats", "--iters", "1", "--warmup", "0")
    assert proc.returncode != 0
    assert "tegrastats not found on PATH" in proc.stderr
