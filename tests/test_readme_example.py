"""The documented Python example runs as written and prints what its page says it prints.

The example lives on the Python API page of the docs (``docs/reference/python-api.md``, which the README links);
the soak figures quoted on the development page are those of the committed JSON.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PYTHON_API = ROOT / "docs" / "reference" / "python-api.md"
DEVELOPMENT = ROOT / "docs" / "development.md"


def python_block(heading: str, page: Path = PYTHON_API) -> str:
    """The first fenced ```python block after the Markdown ``heading`` line (and before the next heading)."""
    text = "\n" + page.read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)[1]
    section = re.split(r"\n#{1,2} ", section, maxsplit=1)[0]
    match = re.search(r"^```python\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE)
    assert match is not None, f"no ```python block under {heading!r} in {page.name}"
    return match.group(1)


def test_the_block_uses_the_public_names_the_issue_asks_for() -> None:
    code = python_block("# Python API")
    for name in ("compress_", "method_config", "onnx_from_torch", "optimize", "check_onnx_parity", "OrtRunner"):
        assert name in code
    assert "benchmark(" in code
    assert len(code.splitlines()) <= 30


def test_readme_python_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    namespace: dict[str, object] = {"__name__": "readme_example"}
    try:
        exec(compile(python_block("# Python API"), str(PYTHON_API), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines
    assert lines[0] == "params ×2.04"  # the figure the page quotes (ratio=2 asked)
    parity = re.fullmatch(r"parity PASS max_abs=(\S+)", lines[1])
    assert parity is not None, lines[1]
    assert 0 <= float(parity.group(1)) < 1e-5
    latency = re.fullmatch(r"p50 (\d+\.\d+) ms, speedup (\d+\.\d+)× \(95 % CI (\d+\.\d+)–(\d+\.\d+)\)", lines[2])
    assert latency is not None, lines[2]
    p50, ratio_p50, low, high = map(float, latency.groups())
    assert p50 > 0
    assert 0 < low <= ratio_p50 <= high
    result = namespace["result"]
    assert result.stats["compressed"].p50 == pytest.approx(p50, abs=0.005)  # type: ignore[attr-defined]
    assert result.stats["compressed"].n >= 20  # type: ignore[attr-defined]
    assert namespace["parity"].passed  # type: ignore[attr-defined]


def test_soak_figures_are_those_of_the_committed_json() -> None:
    import json

    soak = json.loads((ROOT / "benchmarks" / "results" / "soak.json").read_text(encoding="utf-8"))
    summary, samples = soak["summary"], soak["samples"]
    assert soak["iters"] == 20_000
    assert [s["iteration"] for s in samples] == list(range(0, 20_001, 1_000))
    assert not summary["torch_imported"]
    rss = [s["rss_bytes"] / 2**20 for s in samples]
    assert summary["rss_min_mib"] == pytest.approx(min(rss))
    assert summary["rss_max_mib"] == pytest.approx(max(rss))
    assert summary["drift_mib"] == pytest.approx(rss[-1] - rss[1])
    text = " ".join(DEVELOPMENT.read_text(encoding="utf-8").split())
    quoted = (
        f"{summary['rss_min_mib']:.1f}–{summary['rss_max_mib']:.1f} MiB, +{summary['drift_mib']:.2f} MiB from "
        f"iteration 1,000 to 20,000"
    )
    assert quoted in text
    assert f"+{summary['drift_second_half_mib']:.2f} MiB over the last 10,000" in text
