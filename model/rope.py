"""Rotary position embeddings: 1-D RoPE and M-RoPE from one routine.

M-RoPE (Qwen2-VL) drives contiguous groups of rotary frequency pairs by different position ids: the first
`sections[0]` pairs by the temporal id, the next by the row (height) id, the last by the column (width) id.
Text tokens carry equal (t, h, w) ids, so for them every pair sees the same position and M-RoPE is exactly
1-D RoPE. 1-D RoPE is the split (head_dim // 2, 0, 0).
"""

from __future__ import annotations

import torch


class Rotary(torch.nn.Module):
    def __init__(
        self, head_dim: int, sections: tuple[int, int, int], theta: float = 10000.0, interleaved: bool = False
    ):
        """interleaved: pair i (frequency theta^(-2i/head_dim)) follows component i % 3, so every component gets
        high and low frequencies, instead of `sections` contiguous runs from the highest frequency down."""
        super().__init__()
        pairs = head_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(pairs, dtype=torch.float64) * 2 / head_dim))
        # Which of the three position components drives each frequency pair.
        if interleaved:
            component = torch.arange(pairs) % 3
        else:
            component = torch.repeat_interleave(torch.arange(3), torch.tensor(sections), output_size=pairs)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.register_buffer("component", component, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (B, T, 3) or (B, T) integer ids -> cos, sin of shape (B, T, 1, head_dim // 2), broadcast over
        the heads of (B, T, H, D) queries and keys."""
        if positions.dim() == 2:
            positions = positions.unsqueeze(-1).expand(*positions.shape, 3)
        cos, sin = rotary_tables(positions, self.inv_freq, self.component)
        return cos.unsqueeze(2), sin.unsqueeze(2)


def _rotary_tables_op():
    """`rotary_tables`, defined once a process. An HF export inlines this file into its own module
    (train/hf/export.py); loaded beside the package, a second definition took the op over with the copy's functions,
    which the package's op went on calling after they were collected (a segfault in tests/test_hf.py, fresh-clone
    CI). A second copy uses the op already there: the same code."""
    if hasattr(torch.ops.fusion, "rotary_tables"):
        return torch.ops.fusion.rotary_tables

    @torch.library.custom_op("fusion::rotary_tables", mutates_args=())
    def rotary_tables(
        positions: torch.Tensor, inv_freq: torch.Tensor, component: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the angles, (B, T, pairs) each, computed once a forward. An op inductor cannot see into,
        on purpose: written inline, a compiled forward recomputed the gather, the multiply and the cos and sin inside
        every layer's query and key kernels, forwards and backwards (cheap pointwise work, by inductor's rule), which
        at the study's heads of 16 made those kernels among the step's largest
        (docs/perf/study_step4_profile_d8_h200.txt)."""
        angles = positions.index_select(-1, component).float() * inv_freq.float()  # float32, as the fake says
        return angles.cos(), angles.sin()

    @rotary_tables.register_fake
    def _(positions, inv_freq, component):
        shape = (*positions.shape[:-1], inv_freq.shape[0])
        return positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32)

    return rotary_tables


rotary_tables = _rotary_tables_op()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) by half-split pairs (x[..., :D/2], x[..., D/2:]) in float32, return x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
