"""The packed-trials benchmark: its trials/hour arithmetic, a 2-step smoke run, and the
machine line every bench table carries (CPU model, instruction sets, GPUs, matmul peak)."""
import pytest

from tools import bench_pack, machine

PEAK = 2e9


def test_trials_per_hour_by_hand():
    # 82 epochs of 50,000 examples at m = 8: 512,500 steps; at 10 ms a step one trial
    # takes 5,125 s, so 0.7024 trials an hour; a pack of 8 at 40 ms a step, 8 x 1/4 of it.
    assert bench_pack.trials_per_hour(0.010, 8) == pytest.approx(3600 / 5125)
    assert bench_pack.trials_per_hour(0.040, 8, 8) == pytest.approx(2 * 3600 / 5125)


@pytest.fixture(scope="module")
def smoke():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_pack.machine, "gpu_models", lambda: [])
        return bench_pack.run("resnet8", "none", [2], k=2, workers=0, steps=2, repeats=1,
                              shape=(8, 8, 3), peak=PEAK)


def test_smoke_row_compares_the_pack_with_one_trial_at_a_time(smoke):
    (row,), _ = smoke
    assert (row["m"], row["k"]) == (2, 2)
    assert row["packed_speedup"] == pytest.approx(2 * row["single_ms"] / row["packed_ms"])
    assert row["packed_trials_per_hour"] == pytest.approx(
        bench_pack.trials_per_hour(row["packed_ms"] / 1e3, 2, 2))
    assert row["packed_limit_fraction"] == pytest.approx(
        2 * row["single_limit_fraction"] * row["single_ms"] / row["packed_ms"])
    # The grouped formulation (one fused network) is a column of its own.
    assert row["grouped_speedup"] == pytest.approx(2 * row["single_ms"] / row["grouped_ms"])
    assert row["grouped_trials_per_hour"] == pytest.approx(
        bench_pack.trials_per_hour(row["grouped_ms"] / 1e3, 2, 2))


def test_smoke_table_names_the_machine(smoke):
    text = bench_pack.markdown(*smoke)
    model, isa = machine.cpu_info()
    assert f"CPU: {model}" in text and "float32 matmul peak 2 GFLOP/s" in text
    assert all(flag in text for flag in isa)
    assert "| resnet8 | none | 2 | 2 |" in text and "grouped pack ms/step" in text


def test_breakdown_profiles_every_contender_per_k_trials():
    # Structure only (no timings are asserted): every contender's op classes, the convs
    # among them, and one trial's step counted K times.
    table = bench_pack.breakdown("resnet8", "none", 2, 2, steps=2, jit=False,
                                 shape=(8, 8, 3))
    assert list(table) == ["one trial × K", "separate pack", "grouped pack"]
    for column in table.values():
        assert column["wall"] > 0 and column["conv fwd"] > 0
    text = bench_pack.breakdown_markdown("resnet8", "none", 2, 2, table)
    assert "| op class | one trial × K | separate pack | grouped pack |" in text
    assert "| wall (timed) |" in text and "| conv fwd |" in text


@pytest.mark.bad_input("bench_pack --breakdown / --batch_sizes that are not batch sizes")
@pytest.mark.parametrize("flag", ["--breakdown=x", "--breakdown=0", "--batch_sizes=2,-8"])
def test_bad_batch_sizes_are_one_line_before_measuring(flag):
    import subprocess
    import sys

    from processes import REPO

    proc = subprocess.run([sys.executable, "-m", "tools.bench_pack", flag, "--workers=0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    name = flag.split("=")[0]
    lines = [line for line in proc.stderr.splitlines() if "takes batch sizes" in line]
    assert len(lines) == 1 and f"{name} takes batch sizes m >= 1" in lines[0], \
        proc.stderr[-500:]
    assert "matmul peak" not in proc.stdout  # nothing was measured


def test_cpu_info_reads_model_and_instruction_sets(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n"
                       "flags\t\t: fpu sse4_2 avx avx2 fma bmi2\n\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu\n")
    assert machine.cpu_info(str(cpuinfo)) == ("AMD EPYC 7B13",
                                              ["sse4_2", "avx", "avx2", "fma"])
    line = machine.line({"cpu_model": "AMD EPYC 7B13", "isa": ["avx2"], "cpus": 2,
                         "gpu_models": []}, 150e0)
    assert line == ("CPU: AMD EPYC 7B13 (2 CPUs; ISA: avx2); GPU: none; float32 matmul "
                    "peak 150 GFLOP/s.")


def test_conv_formulations_time_every_variant():
    table = bench_pack.conv_formulations(2, 2, channels=2, size=4, steps=5, repeats=1)
    assert set(table) == {"one trial", "K separate", "grouped", "one trial XLA",
                          "K separate XLA", "grouped XLA"}
    assert all(v > 0 for v in table.values())
    assert "| 2 | " in bench_pack.formulations_markdown(2, {2: table})
