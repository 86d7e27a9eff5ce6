import pytest
import torch

from synth.errors import DeviceError
from synth.runtime import derive_seed, resolve_device, torch_generator


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_unavailable_is_a_clear_error():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda")


def test_derive_seed_stable_and_distinct():
    assert derive_seed(0, "a", 1) == derive_seed(0, "a", 1)
    assert derive_seed(0, "a", 1) != derive_seed(0, "a", 2)
    assert derive_seed(1, "a") != derive_seed(0, "a")
    assert 0 <= derive_seed(123, "x") < 2**31


def test_torch_generator_repeats():
    a = torch.rand(3, generator=torch_generator(5))
    b = torch.rand(3, generator=torch_generator(5))
    assert torch.equal(a, b)


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch):
    from synth import runtime

    monkeypatch.setattr(runtime, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert runtime.native_bf16("cpu")
    assert runtime.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not runtime.native_bf16("cpu")
    assert runtime.resolve_precision("auto", "cpu") == "fp32"
    # explicit settings are kept (bf16 where emulated only warns)
    assert runtime.resolve_precision("bf16", "cpu") == "bf16"
    assert runtime.resolve_precision("fp32", "cpu") == "fp32"
    assert runtime.resolve_precision("fp16", "cpu") == "fp32"  # fp16 is CUDA only


def test_cpu_flags_are_read_from_proc_cpuinfo_where_there_is_one():
    import os

    from synth import runtime

    flags = runtime._cpu_flags()
    assert isinstance(flags, frozenset)
    if os.path.exists("/proc/cpuinfo") and os.uname().machine in ("x86_64", "AMD64"):
        assert "sse2" in flags  # every x86-64 CPU has it
