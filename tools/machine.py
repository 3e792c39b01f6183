"""What machine a benchmark ran on: CPU model and the instruction sets that matter for TF's
kernels, and the GPU models. Ratios between implementations flip between machines (an
AVX-512 Xeon vs an AVX2 EPYC), so every bench table records this beside the matmul peak."""
import os
import platform

# Instruction-set flags (as /proc/cpuinfo spells them) that change which kernels oneDNN,
# Eigen and XLA pick: vector width, FMA, bf16/int8 dot products, AMX tiles; ARM's too.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def cpu_info(path="/proc/cpuinfo"):
    """(model name, [ISA flags present, in ISA_FLAGS order]); the model from `platform`
    and no flags where /proc/cpuinfo is not there (macOS, Windows)."""
    model, flags = None, set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and model is None:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), [
        f for f in ISA_FLAGS if f in flags]


def gpu_models():
    """The local GPUs' model names (empty without GPUs)."""
    import tensorflow as tf

    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            names.append(tf.config.experimental.get_device_details(gpu).get("device_name",
                                                                             gpu.name))
        except (RuntimeError, ValueError):
            names.append(gpu.name)
    return names


def describe():
    """{"cpu_model", "isa", "cpus", "gpu_models"} of this machine."""
    model, isa = cpu_info()
    return {"cpu_model": model, "isa": isa, "cpus": os.cpu_count(), "gpu_models": gpu_models()}


def line(device, peak_gflops=None):
    """One markdown line: CPU model, ISA, cores, GPUs, matmul peak."""
    isa = ", ".join(device.get("isa") or []) or "unknown"
    gpus = ", ".join(device.get("gpu_models") or []) or "none"
    peak = f"; float32 matmul peak {peak_gflops:.0f} GFLOP/s" if peak_gflops else ""
    return (f"CPU: {device.get('cpu_model')} ({device.get('cpus')} CPUs; ISA: {isa}); "
            f"GPU: {gpus}{peak}.")
