"""Mixed precision (``--amp``).

``off`` (default) is fp32 everywhere, as the release, for exact reproduction.
``bf16`` runs the training forward after the frozen prefix
(suffix blocks with the module, neck, decoder) and all of test-time inference
under ``torch.autocast(dtype=torch.bfloat16)``. The training loss is computed in
fp32 on the float32-cast outputs and the backward runs outside autocast
(PyTorch's recommended pattern; bf16 needs no gradient scaling). The prefix
cached for training stays fp32, so the selector's buffer is the fp32 one.

It runs on CUDA GPUs with bfloat16 support and on CPUs with native bfloat16
arithmetic (AVX512-BF16 or AMX: 2.7x faster than fp32 for ViT-B on the
project's 2-core machine). Elsewhere it is refused: emulated bfloat16 is slower
than fp32.
"""
import contextlib
from typing import Any, Callable

import torch

AMP_MODES = ("off", "bf16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX tiles)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own feature probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def check_amp(amp: str, device: torch.device) -> None:
    """Refuse a mixed-precision setting the device cannot run fast, with the fix."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    if amp == "off":
        return
    device = torch.device(device)
    if device.type == "cpu":
        if not cpu_has_native_bf16():
            raise ValueError(f"--amp {amp}: this CPU has no native bfloat16 (AVX512-BF16 or AMX), where it is "
                             f"slower than fp32; drop --amp (fp32, the default) or train/test on a GPU")
        return
    if device.type != "cuda":
        raise ValueError(f"--amp {amp} runs on CUDA GPUs and bfloat16 CPUs only (this run is on {device}); drop --amp")
    if not torch.cuda.is_bf16_supported():
        raise ValueError(f"--amp bf16: GPU {torch.cuda.get_device_name(device)} has no bfloat16 support; drop --amp")


def amp_available(device: torch.device) -> bool:
    """Whether ``--amp bf16`` can run on ``device``."""
    try:
        check_amp("bf16", device)
    except ValueError:
        return False
    return True


def autocast(amp: str, device: torch.device):
    """Context that runs the enclosed forward in ``amp`` precision (a no-op for ``off``)."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def to_float(out: Any) -> Any:
    """Floating tensors in a (nested tuple/list/dict) result cast to float32."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(to_float(o) for o in out)
    if isinstance(out, dict):
        return {k: to_float(v) for k, v in out.items()}
    return out


def amp_forward(fn: Callable, amp: str, device: torch.device) -> Callable:
    """``fn`` itself for ``off``; otherwise ``fn`` run under autocast with float32 outputs
    (so the loss that follows is computed in fp32)."""
    if amp == "off":
        return fn

    def run(*args, **kwargs):
        with autocast(amp, device):
            out = fn(*args, **kwargs)
        return to_float(out)

    return run
