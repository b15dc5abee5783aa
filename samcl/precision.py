"""Mixed precision (``--amp``, speed, issue 8).

``off`` (default) is fp32 everywhere, as the release, for exact reproduction.
``bf16`` runs, on CUDA only, the training forward after the frozen prefix
(suffix blocks with the module, neck, decoder) and all of test-time inference
under ``torch.autocast(dtype=torch.bfloat16)``. The training loss is computed in
fp32 on the float32-cast outputs and the backward runs outside autocast
(PyTorch's recommended pattern; bf16 needs no gradient scaling). The prefix
cached for training stays fp32, so the selector's buffer is the fp32 one.

On the CPU ``--amp bf16`` is refused: bfloat16 autocast there is slower than
fp32 on most CPUs and is not what the option is for.
"""
import contextlib
from typing import Any, Callable

import torch

AMP_MODES = ("off", "bf16")


def check_amp(amp: str, device: torch.device) -> None:
    """Refuse a mixed-precision setting the device cannot run, with the fix."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    if amp == "off":
        return
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"--amp {amp} runs on CUDA GPUs only (this run is on {device}); drop --amp "
                         f"(fp32, the default) or train/test on a GPU")
    if not torch.cuda.is_bf16_supported():
        raise ValueError(f"--amp bf16: GPU {torch.cuda.get_device_name(device)} has no bfloat16 support; drop --amp")


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
