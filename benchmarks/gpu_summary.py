"""The summary of ``benchmarks/gpu_check.sh``: one JSON and one Markdown table from the raw files of its steps.

    python benchmarks/gpu_summary.py RAW_DIR OUT_DIR [--peak-tflops 989]

RAW_DIR holds what the steps wrote (``env.json``, ``steps.jsonl``, ``bench_eager.json``, ``bench_compiled.json``,
``official_*.json``, ``e2e.json``, ``loader.json``; any may be missing when its step failed or was skipped) and
``OUT_DIR/cuda_tests.xml`` the junit of the CUDA tests. Writes ``OUT_DIR/summary.json`` (all of it, the raw rows
included) and ``OUT_DIR/summary.md``: per model, ours eager / compiled (bare step and the scripts' engine loop) and
the official step, img/s, MFU and peak memory, against the speed targets (MFU, and at least 2.5x the official
step).
"""

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

# bf16 MFU targets, and the speed-up over the official step
TARGET_MFU = {
    "mae_vit_large_patch16": 0.45,
    "mae_vit_base_patch16": 0.35,
    "mixmim_base": 0.30,
    "vit_base_patch16": 0.40,
}
TARGET_SPEEDUP = 2.5


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def rows_of(raw: Path, pattern: str) -> list[dict]:
    rows = []
    for path in sorted(raw.glob(pattern)):
        data = load(path)
        if data:
            rows += data.get("results", [])
    return rows


def junit(path: Path) -> dict:
    """Counts and the failed / errored tests of a junit XML, with each test's recorded properties."""
    if not path.is_file():
        return {"present": False}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"present": True, "error": str(e)}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    out = {"present": True, **{k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}}
    out["time_s"] = float(suite.get("time", 0))
    out["cases"] = []
    for case in suite.iter("testcase"):
        status = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status = tag
                message = (node.get("message") or node.text or "")[:300]
                break
        else:
            message = ""
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        out["cases"].append({"test": case.get("name"), "status": status, "message": message, "properties": props,
                             "time_s": float(case.get("time", 0))})  # fmt: skip
    return out


def fmt(value, spec: str = ".0f", suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix


def table(ours: list[dict], official: list[dict], peak: float) -> tuple[list[str], list[dict]]:
    gflops = {r["model"]: r["gflops_per_image"] for r in ours if "gflops_per_image" in r}
    models = list(dict.fromkeys([r["model"] for r in ours] + [r["model"] for r in official]))
    lines = [
        "| model | batch | ours eager step | ours eager engine | ours compiled step | ours compiled engine | "
        "official (fp16) | best engine / official | best MFU (engine) | MFU target | peak GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    verdicts = []
    for m in models:
        cells = {}
        mem = None
        for r in ours:
            if r["model"] == m and "images_per_s" in r:
                cells[(r["compile"], r["loop"])] = r
                mem = max(mem or 0.0, r.get("peak_mem_gib") or 0.0)
        off = next((r for r in official if r["model"] == m and "images_per_s" in r), None)
        engines = [cells[k]["images_per_s"] for k in ((False, "engine"), (True, "engine")) if k in cells]
        best = max(engines) if engines else None
        speedup = best / off["images_per_s"] if best and off else None
        mfu = best * gflops[m] * 1e9 / (peak * 1e12) if best and m in gflops else None
        batch = next((r.get("batch") for r in ours + official if r["model"] == m), None)

        def ips(key, cells=cells):
            return fmt(cells[key]["images_per_s"]) if key in cells else "–"

        lines.append(
            f"| `{m}` | {batch} | {ips((False, 'step'))} | {ips((False, 'engine'))} | {ips((True, 'step'))} | "
            f"{ips((True, 'engine'))} | {fmt(off['images_per_s']) if off else '–'} | {fmt(speedup, '.2f', 'x')} | "
            f"{fmt(mfu and 100 * mfu, '.1f', '%')} | {fmt(TARGET_MFU.get(m) and 100 * TARGET_MFU[m], '.0f', '%')} | "
            f"{fmt(mem, '.1f')} |"
        )
        verdicts.append({"model": m, "best_engine_images_per_s": best, "official_images_per_s": off and
                         off["images_per_s"], "speedup": speedup, "mfu": mfu, "mfu_target": TARGET_MFU.get(m),
                         "mfu_met": None if mfu is None or m not in TARGET_MFU else mfu >= TARGET_MFU[m],
                         "speedup_met": None if speedup is None else speedup >= TARGET_SPEEDUP})  # fmt: skip
    return lines, verdicts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("raw", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    args = p.parse_args()
    raw, out = args.raw, args.out

    steps = [json.loads(line) for line in (raw / "steps.jsonl").read_text().splitlines() if line.strip()] if (
        raw / "steps.jsonl").is_file() else []  # fmt: skip
    ours = rows_of(raw, "bench_*.json")
    official = rows_of(raw, "official_*.json")
    errors = [r for r in ours + official if "error" in r]
    tests = junit(out / "cuda_tests.xml")
    lines, verdicts = table(ours, official, args.peak_tflops)
    summary = {
        "env": load(raw / "env.json"),
        "steps": steps,
        "cuda_tests": tests,
        "verdicts": verdicts,
        "peak_tflops": args.peak_tflops,
        "raw": {path.name: load(path) for path in sorted(raw.glob("*.json"))},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    md = ["# GPU check", "", f"Environment: `{json.dumps(summary['env'])}`", "", "## Steps", ""]
    md += [f"- {s['step']}: {s['status']} ({s['seconds']} s)" for s in steps]
    md += ["", "## CUDA tests", ""]
    if tests.get("present"):
        md.append(f"{tests.get('tests')} tests, {tests.get('failures')} failed, {tests.get('errors')} errors, "
                  f"{tests.get('skipped')} skipped, {tests.get('time_s', 0):.0f} s")  # fmt: skip
        for case in tests.get("cases", []):
            if case["status"] != "skipped":
                props = ", ".join(f"{k} {float(v):.2e}" for k, v in case["properties"].items())
                md.append(f"- {case['status']}: {case['test']} ({case['time_s']:.1f} s){': ' + props if props else ''}"
                          f"{' — ' + case['message'] if case['message'] else ''}")  # fmt: skip
    else:
        md.append("no junit file (the step did not run)")
    md += ["", f"## Throughput (img/s, bf16 unless marked; MFU at {args.peak_tflops:g} TFLOP/s)", "", *lines]
    if errors:
        md += [
            "",
            "Rows that failed:",
            *[f"- {r.get('model')}{' (compiled)' if r.get('compile') else ''}: {r['error']}" for r in errors],
        ]
    e2e = load(raw / "e2e.json")
    if e2e:
        md += ["", "## main_pretrain.py end to end (generated JPEGs; the last progress line's img/s)", "",
               "| model | decode | workers | img/s |", "| --- | --- | ---: | ---: |"]  # fmt: skip
        md += [f"| `{r.get('model')}` | {r.get('decode')} | {r.get('workers')} | {fmt(r.get('images_per_s'))}"
               f"{' ' + r['error'] if 'error' in r else ''} |" for r in e2e["results"]]  # fmt: skip
    loader = load(raw / "loader.json")
    if loader:
        md += ["", "## Loader (generated ImageNet-sized JPEGs)", "", "| transform | workers | img/s |",
               "| --- | ---: | ---: |"]  # fmt: skip
        md += [
            f"| {r.get('transform')} | {r.get('workers')} | {fmt(r.get('images_per_s'))} |" for r in loader["results"]
        ]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
