"""Smoke test: the throughput benchmark runs both frameworks and reports a ratio.

Speed itself is measured by the benchmark command, never asserted here.
"""

import json

from benchmarks import throughput


def test_vs_runs_both_frameworks(capsys):
    assert throughput.main(["--vs", "--model", "tiny", "--mode", "eval", "--batch", "1",
                            "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["frameworks"]) == {"jax", "torch"}
    assert result["frameworks"]["jax"]["images_per_s"] > 0
    assert result["frameworks"]["jax"]["flops_per_step"] > 1e9  # Swin-T is ~9 GFLOPs/image.
    assert len(result["ratios"]) == 1 and result["median_ratio"] > 0


def test_peak_lookup():
    assert throughput.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert throughput.peak_flops("cpu") is None
