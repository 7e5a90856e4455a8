"""benchmarks/bench_train.py: the FLOP count against the architecture's formula, and the row arithmetic."""

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)


def block_macs(tokens: int, dim: int) -> int:
    """One ViT block: qkv, q @ k^T, attn @ v, proj, and the MLP (ratio 4)."""
    return tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * 4 * dim


def fwd_bwd_flops(fwd_macs: int, patch_embed_macs: int) -> int:
    """Backward costs twice the forward, except the patch embedding: no gradient for the images themselves."""
    return 3 * 2 * fwd_macs - 2 * patch_embed_macs


PATCH_EMBED = 64 * (4 * 4 * 3) * 192  # 64 patches of 4x4x3 -> 192 channels


def count(name: str) -> float:
    args = bench_train.get_args_parser().parse_args(["--models", name])
    model = bench_train.build_model(name, args, torch.device("cpu"))
    return bench_train.count_flops_per_image(model, 32, torch.device("cpu"), None)


def test_flops_of_the_vit_classifier() -> None:
    """vit_tiny_patch4: 65 tokens of 192 channels, 6 blocks, a 1000-class head."""
    fwd = PATCH_EMBED + 6 * block_macs(65, 192) + 192 * 1000
    assert count("vit_tiny_patch4") == fwd_bwd_flops(fwd, PATCH_EMBED)


def test_flops_of_mae_count_only_the_visible_tokens_in_the_encoder() -> None:
    """mae_vit_tiny_patch4 at mask ratio 0.75: the encoder sees 16 + 1 tokens, the decoder (128 channels, 2
    blocks) all 64 + 1, and predicts 4x4x3 pixels per token."""
    encoder = 6 * block_macs(17, 192)
    decoder = 17 * 192 * 128 + 2 * block_macs(65, 128) + 65 * 128 * 48
    assert count("mae_vit_tiny_patch4") == fwd_bwd_flops(PATCH_EMBED + encoder + decoder, PATCH_EMBED)


@pytest.mark.parametrize(("name", "ratio"), [("mae_vit_tiny_patch4", 0.75), ("mixmim_tiny", 0.5)])
def test_engine_loop_takes_the_models_mask_ratio_also_when_compiled(name: str, ratio: float) -> None:
    args = bench_train.get_args_parser().parse_args(["--models", name])
    model = bench_train.build_model(name, args, torch.device("cpu"))
    assert bench_train.default_mask_ratio(model) == ratio
    assert bench_train.default_mask_ratio(torch.compile(model)) == ratio  # compiles nothing until called


@pytest.fixture
def restore_log_levels():
    """bench_train.main quiets the engines' loggers; give the other tests theirs back."""
    names = ("engine_pretrain", "engine_finetune", "util.metrics")
    levels = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


@pytest.mark.parametrize("loop", ["step", "engine"])
def test_rows_and_json(tmp_path: Path, loop: str, restore_log_levels) -> None:
    out = tmp_path / "bench.json"
    argv = [
        "--device",
        "cpu",
        "--models",
        "mae_vit_tiny_patch4",
        "--batch-size",
        "2",
        "--amp",
        "none",
        "--loop",
        loop,
        "--warmup",
        "1",
        "--steps",
        "2",
        "--repeats",
        "2",
        "--peak-tflops",
        "0.5",
        "--json",
        str(out),
    ]
    rows = bench_train.main(bench_train.get_args_parser().parse_args(argv))
    saved = json.loads(out.read_text())["results"]
    assert saved == json.loads(json.dumps(rows))
    (row,) = rows
    assert row["loop"] == loop and len(row["images_per_s_all"]) == 2
    assert row["images_per_s"] == pytest.approx(sum(row["images_per_s_all"]) / 2)  # the median of two
    assert row["step_ms"] == pytest.approx(1000 * 2 / row["images_per_s"])
    assert row["mfu"] == pytest.approx(row["gflops_per_image"] * 1e9 * row["images_per_s"] / 0.5e12)


@pytest.mark.parametrize("name", ["vit_tiny_patch4", "mae_vit_tiny_patch4", "mixmim_tiny", "mixmim_tiny_ft"])
def test_flops_only_counts_on_the_meta_device_what_a_real_device_counts(
    tmp_path: Path, name: str, restore_log_levels
) -> None:
    """--flops-only builds the model on the meta device (no weights), yet counts exactly the FLOPs of a real run."""
    out = tmp_path / "flops.json"
    argv = ["--flops-only", "--models", name, "--peak-tflops", "989", "--json", str(out)]
    (row,) = bench_train.main(bench_train.get_args_parser().parse_args(argv))
    assert json.loads(out.read_text())["results"] == [row]

    args = bench_train.get_args_parser().parse_args(["--models", name])
    model = bench_train.build_model(name, args, torch.device("cpu"))
    pretrain = bench_train.is_pretrain_model(model)
    ratio = bench_train.default_mask_ratio(model) if pretrain else None
    real = bench_train.count_flops_per_image(model, bench_train.input_size(model), torch.device("cpu"), ratio)
    assert row["gflops_per_image"] * 1e9 == pytest.approx(real, rel=1e-12)  # the same count, up to the / 1e9
    assert row["mask_ratio"] == ratio and row["kind"] == ("pretrain" if pretrain else "finetune")
    # parameters, and MixMIM's fixed position table, a frozen parameter in the official model (a buffer here)
    table = model.absolute_pos_embed.numel() if hasattr(model, "absolute_pos_embed") else 0
    assert row["params_m"] * 1e6 == sum(p.numel() for p in model.parameters()) + table
    assert row["images_per_s_at_peak"] == pytest.approx(989e12 / real)


@pytest.mark.parametrize(
    "name, params",
    [
        ("vit_base_patch16", 86_567_656),  # ViT-B/16 with a 1000-class head, the figure of the ViT paper's model
        # vit_tiny_patch4 (10 classes): patch embedding, cls token, 65 positions, 6 blocks of width 192 with MLP
        # ratio 4 (2 norms, qkv, proj, fc1, fc2), the final norm, the head
        (
            "vit_tiny_patch4",
            (3 * 16 * 192 + 192)
            + 192
            + 65 * 192
            + 6 * (4 * 192 + (192 * 576 + 576) + (192 * 192 + 192) + (192 * 768 + 768) + (768 * 192 + 192))
            + 2 * 192
            + (192 * 1000 + 1000),
        ),
    ],
)
def test_flops_only_counts_the_parameters(name: str, params: int, restore_log_levels) -> None:
    (row,) = bench_train.main(bench_train.get_args_parser().parse_args(["--flops-only", "--models", name]))
    assert row["params_m"] == pytest.approx(params / 1e6, rel=1e-12)


def test_flops_only_names_the_model_it_cannot_count(restore_log_levels) -> None:
    argv = ["--flops-only", "--models", "mae_vit_nope"]
    with pytest.raises(SystemExit, match="cannot count mae_vit_nope: unknown --model 'mae_vit_nope'"):
        bench_train.main(bench_train.get_args_parser().parse_args(argv))


def test_gpu_summary_takes_the_best_engine_loop_against_the_official_step(tmp_path: Path) -> None:
    """benchmarks/gpu_summary.py: speed-up = the faster of our eager / compiled engine loops over the official step;
    MFU = that rate x FLOPs per image / peak; the junit's failures and recorded properties are kept."""
    spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "benchmarks" / "gpu_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir(), out.mkdir()

    def row(compiled: bool, loop: str, ips: float) -> dict:
        return {"model": "mae_vit_base_patch16", "batch": 128, "compile": compiled, "loop": loop, "images_per_s": ips,
                "gflops_per_image": 58.5, "peak_mem_gib": 20.0 if compiled else 30.0}  # fmt: skip

    (raw / "bench_eager.json").write_text(
        json.dumps({"results": [row(False, "step", 3000), row(False, "engine", 2900)]})
    )
    (raw / "bench_compiled.json").write_text(
        json.dumps({"results": [row(True, "step", 4200), row(True, "engine", 4000)]})
    )
    official = {"model": "mae_vit_base_patch16", "batch": 128, "images_per_s": 1000.0}
    (raw / "official_mae.json").write_text(json.dumps({"results": [official, {"model": "x", "error": "boom"}]}))
    (raw / "steps.jsonl").write_text('{"step": "bench_eager", "status": "ok", "seconds": 50}\n')
    (out / "cuda_tests.xml").write_text(
        '<testsuites><testsuite tests="2" failures="1" errors="0" skipped="0" time="3.5">'
        '<testcase name="test_a" time="1.0"><properties><property name="grad_rel_l2_err" value="0.01"/></properties>'
        '</testcase><testcase name="test_b" time="2.5"><failure message="too far">x</failure></testcase>'
        "</testsuite></testsuites>"
    )
    import sys

    argv, sys.argv = sys.argv, ["gpu_summary.py", str(raw), str(out), "--peak-tflops", "989"]
    try:
        summary.main()
    finally:
        sys.argv = argv
    result = json.loads((out / "summary.json").read_text())
    verdict = result["verdicts"][0]
    assert verdict["speedup"] == pytest.approx(4.0) and verdict["speedup_met"] is True
    assert verdict["mfu"] == pytest.approx(4000 * 58.5e9 / 989e12) and verdict["mfu_met"] is False  # 23.7% < 35%
    tests = result["cuda_tests"]
    assert (tests["tests"], tests["failures"]) == (2, 1)
    assert tests["cases"][0]["properties"] == {"grad_rel_l2_err": "0.01"} and tests["cases"][1]["message"] == "too far"
    md = (out / "summary.md").read_text()
    assert "| `mae_vit_base_patch16` | 128 | 3000 | 2900 | 4200 | 4000 | 1000 | 4.00x | 23.7% | 35% | 30.0 |" in md
    assert "- x: boom" in md
