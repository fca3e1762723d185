"""The SwiGLU MLP, with its activation fused into the matmuls on Hopper-class GPUs when QuACK is installed.

Why: in torch's ops the gate-up matmul writes gate and up, a separate kernel reads them to write silu(gate) * up,
and the backward reads both again to write their gradients: at 125M these element-wise passes took 10 of the
step's 118 ms of GPU time (docs/PERFORMANCE.md, round 7's profile). QuACK (Tri Dao's CuTe DSL kernels,
`pip install quack-kernels`) does the activation in the gate-up GEMM's epilogue and its derivative in the epilogue
of the GEMM that makes the gradient of silu(gate) * up, so those passes disappear. Its GEMMs are custom ops with
autograd, so compiled blocks keep them in their graphs. Elsewhere (CPU, no QuACK, fp32, `FUSED = False`, or
`fused` turned off on the module) the layers run as torch's `nn.Linear` with the same weights, so checkpoints are
the same either way.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

FUSED = True  # benchmarks/gpu_step.py's `torchmlp` turns it off to compare
TUNED = False  # QuACK's autotuning of tile shapes per GEMM (compiles every candidate once; minutes)
# Narrower models keep torch's kernels: on an H100 QuACK's GEMMs ran the 20M MLP (width 384) at 273 TFLOP/s untuned
# and 365 tuned against cuBLAS + inductor's 421, and the 125M one (768) at 580 against 546 (benchmarks/mlp.py).
MIN_WIDTH = 768

_mlp_func = None
if importlib.util.find_spec("quack") is not None and torch.cuda.is_available():
    try:
        from quack.mlp import mlp_func as _mlp_func
    except Exception as exc:  # a QuACK that cannot load here (a mismatched cutlass-dsl, driver or torch): say so
        import warnings

        warnings.warn(f"quack is installed but did not import ({exc!r}); the MLP runs torch's kernels", stacklevel=1)


def fused_available() -> bool:
    """Whether this process can run the fused path at all (QuACK imported, a GPU of compute capability 9.0+)."""
    return _mlp_func is not None and torch.cuda.get_device_capability()[0] >= 9


class MLP(nn.Module):
    """SwiGLU: w_down(silu(gate) * up) with gate and up the two halves of w_gate_up's output.

    The fused path reads both layers' weights directly, without calling the layers, so an engine that gathers
    sharded weights in each layer's own forward (ZeRO-3) must turn `fused` off; train.engine does, and under
    activation checkpointing too, where the fused path doubled the step's peak memory."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)
        # A plain attribute, so compiled graphs see a constant; QuACK's tiles want these multiples.
        self.fused = fused_available() and d_model >= MIN_WIDTH and d_model % 8 == 0 and hidden % 8 == 0

    def runs_fused(self, dtype: torch.dtype) -> bool:
        """Whether a CUDA input of this dtype takes QuACK's path: bf16 or fp16, as the weights are (not fp32 weights
        under autocast)."""
        low = dtype in (torch.bfloat16, torch.float16)
        return FUSED and self.fused and low and self.w_gate_up.weight.dtype == dtype

    def forward(self, x):
        if x.is_cuda and x.stride(-1) == 1 and self.runs_fused(x.dtype):
            w1, w2 = self.w_gate_up.weight, self.w_down.weight
            return _mlp_func(x, w1, w2, activation="swiglu", concat_layout=True, tuned=TUNED)
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)
