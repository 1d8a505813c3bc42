"""Fused integrate-and-fire scan: K steps of ``if_step`` for a whole layer in one pass, with the
spike and synaptic-operation counts of every step computed alongside (no second pass).

On CUDA it is one Triton kernel: each program holds a block of neurons' membranes in registers
for all K steps and writes its per-step counts to its own slot (float64 sums of 0/1 spikes and
integer fan-outs), summed over programs afterwards - exact in any order, and free of the
contention of every program adding to one counter. Elsewhere it is the same arithmetic as in-place
PyTorch operations. Both do exactly what ``if_step`` does - ``v += I; s = v >= theta;
v -= s theta`` - so spikes are bit-identical to the reference (tests, and ``TRITON_INTERPRET=1``
runs the kernel on the CPU).
"""

from __future__ import annotations

import functools

import torch

from ann2snn.sim.engine import rows_like, step_counts, unit_counts


def if_scan(x: torch.Tensor, steps: int, batch: int, v: torch.Tensor, threshold: float,
            fan: torch.Tensor, body=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance membranes ``v`` ([B, ...], updated in place) over ``steps`` steps of input ``x``
    (K*B time-major rows, or B rows held constant). Returns (outputs theta * s as K*B rows,
    [K, 2] float64 counts: spikes and spikes x fan-out per step, summed over the batch). Off CUDA,
    ``body(x_t, v, out_t)`` (``if_neuron.if_chunk_step`` compiled) may run each step instead of the
    in-place operations; it returns the step's spikes per unit."""
    if x.is_cuda and x.dtype == torch.float32 and _triton_kernel() is not None:
        return _if_scan_triton(x, steps, batch, v, threshold, fan)
    constant = x.shape[0] != steps * batch
    out = rows_like(v, steps * batch)
    fired = torch.empty_like(v) if body is None else None  # 0/1 as floats: comparisons into a float tensor are the fast path on CPUs
    counts = torch.empty(steps, 2, dtype=torch.float64, device=v.device)
    for t in range(steps):
        x_t, o = (x if constant else x[t * batch:(t + 1) * batch]), out[t * batch:(t + 1) * batch]
        if body is not None:
            counts[t] = unit_counts(body(x_t, v, o).flatten().double(), fan)
            continue
        v.add_(x_t)
        torch.ge(v, threshold, out=fired)
        torch.mul(fired, threshold, out=o)
        v.sub_(o)
        counts[t] = step_counts(fired, fan)
    return out, counts


@functools.cache
def _triton_kernel():
    """The Triton kernel, compiled on first use (None where Triton is not installed)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def if_kernel(x_ptr, out_ptr, v_ptr, fan_ptr, partial_ptr, n, units, threshold, steps,
                  CONSTANT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        fan = tl.load(fan_ptr + offs % units, mask=mask, other=0.0)
        current = tl.load(x_ptr + offs, mask=mask, other=0.0)
        for t in range(steps):
            if not CONSTANT:
                current = tl.load(x_ptr + t * n + offs, mask=mask, other=0.0)
            v = v + current
            fired = (v >= threshold) & mask
            o = tl.where(fired, threshold, 0.0)
            v = v - o
            tl.store(out_ptr + t * n + offs, o, mask=mask)
            s = fired.to(tl.float64)
            slot = partial_ptr + 2 * (t * tl.num_programs(0) + tl.program_id(0))
            tl.store(slot, tl.sum(s, axis=0))
            tl.store(slot + 1, tl.sum(s * fan, axis=0))
        tl.store(v_ptr + offs, v, mask=mask)

    return if_kernel


def _if_scan_triton(x, steps, batch, v, threshold, fan):
    n = v.numel()
    constant = x.shape[0] != steps * batch
    out = torch.empty((steps * batch, *v.shape[1:]), dtype=x.dtype, device=x.device)
    block = 1024
    programs = (n + block - 1) // block
    partial = torch.empty(steps, programs, 2, dtype=torch.float64, device=x.device)
    _triton_kernel()[(programs,)](x.contiguous(), out, v, fan.double().contiguous(), partial, n, fan.numel(),
                                  float(threshold), steps, CONSTANT=constant, BLOCK=block)
    return out, partial.sum(1)  # sums of whole numbers below 2^53: exact in any order
