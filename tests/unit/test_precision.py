"""Which precision the training steps use on each device (``runtime.amp``, ``runtime.cpu_bf16``)."""

from __future__ import annotations

import pytest
import torch

from reid_core.config import RuntimeConfig
from reid_core.engine.trainer import Precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("settings", "device", "dtype", "channels_last", "scaled"),
    [
        ({}, CUDA, torch.float16, True, True),
        ({"amp": False, "channels_last": False}, CUDA, None, False, False),
        ({"cpu_bf16": True}, CUDA, torch.float16, True, True),  # CPU setting ignored on CUDA
        ({}, CPU, None, False, False),  # amp / channels_last are CUDA settings
        ({"cpu_bf16": True}, CPU, torch.bfloat16, True, False),
        ({"cpu_bf16": True, "channels_last": False}, CPU, torch.bfloat16, True, False),
    ],
)
def test_precision_per_device(
    settings: dict[str, bool],
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool,
    scaled: bool,
) -> None:
    precision = Precision.for_device(RuntimeConfig(**settings), device)
    assert precision == Precision(dtype, channels_last)
    assert precision.scales_gradients is scaled


def test_prepare_converts_the_model_only_for_channels_last() -> None:
    conv = torch.nn.Conv2d(3, 4, 3)
    assert Precision(None, False).prepare(conv).weight.is_contiguous()
    prepared = Precision(torch.bfloat16, True).prepare(conv)
    assert prepared.weight.is_contiguous(memory_format=torch.channels_last)
    assert not prepared.weight.is_contiguous()


@pytest.mark.parametrize(("native", "dtype"), [(True, torch.bfloat16), (False, None)])
def test_cpu_bf16_auto_follows_the_cpu(
    monkeypatch: pytest.MonkeyPatch, native: bool, dtype: torch.dtype | None
) -> None:
    """``runtime.cpu_bf16=auto``: bfloat16 steps where the CPU has AMX or AVX512-BF16, float32
    where bfloat16 would be emulated (several times slower); CUDA is unaffected."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    runtime = RuntimeConfig(cpu_bf16="auto")
    assert Precision.for_device(runtime, CPU) == Precision(dtype, dtype is not None)
    assert Precision.for_device(runtime, CUDA) == Precision(torch.float16, True)


def test_cpu_bf16_refuses_other_words() -> None:
    with pytest.raises(ValueError, match="cpu_bf16"):
        RuntimeConfig(cpu_bf16="fast")
