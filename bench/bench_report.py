"""Time the report's browser check and its within/across table on a finished demo run.

    cd DEMO_WORKDIR && python /path/to/ckapipe/bench/bench_report.py

Three interleaved repeats of: tools/screenshot_report.py's measure + screenshot at 390 px and at
1280 px (each two Chromium runs), and architecture_similarity on the demo result. Prints medians.
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

from ckapipe.analyze.architecture_summary import architecture_similarity
from ckapipe.analyze.result import load_result

TOOL = Path(__file__).resolve().parents[1] / "tools" / "screenshot_report.py"


def main() -> None:
    spec = importlib.util.spec_from_file_location("screenshot_report", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    browser = tool.find_chromium()
    report = Path("results/demo/report.html")
    result = load_result("results/demo/gratings/cka.zarr")
    groups = {"mlp_s0": "mlp", "mlp_s1": "mlp", "cnn_s0": "cnn", "cnn_s1": "cnn"}
    times: dict[str, list[float]] = {"390 px": [], "1280 px": [], "within/across table": []}
    for _ in range(3):
        for width in (390, 1280):
            started = time.perf_counter()
            layout = tool.measure(report, width, browser=browser)
            out = Path(tempfile.mkdtemp()) / "shot.png"
            tool.screenshot(report, out, width, min(layout["scroll_height"], 8000), browser=browser)
            times[f"{width} px"].append(time.perf_counter() - started)
        started = time.perf_counter()
        architecture_similarity(result, groups)
        times["within/across table"].append(time.perf_counter() - started)
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.3f} s (min {min(values):.3f})")
    print(f"report size: {report.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
