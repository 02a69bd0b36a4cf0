"""Bit-packing of b-bit codes into bytes (any b in 1..8), little-endian; the layout the Triton kernel reads."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tinygpt.surgery.targets import SurgeryError


def check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise SurgeryError(f"bits must be an int from 1 to 8, got {bits!r}")
    return bits


def packed_nbytes(n_codes: int, bits: int) -> int:
    """Bytes holding `n_codes` codes of `bits` bits: ceil(n_codes · bits / 8)."""
    return -(-n_codes * bits // 8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Bit-pack integer codes (< 2^bits) into uint8, little-endian: code i occupies bits [i·b, (i+1)·b).

    Each run of 8 codes becomes `bits` bytes; the stream ends at the byte holding the last code (unused
    high bits are zero). For b in {1, 2, 4} this is the usual 8/b codes per byte, lowest bits first.

    Args:
        codes: integer tensor of any shape (flattened in row-major order).
        bits: 1..8.
    Returns:
        uint8 [packed_nbytes(codes.numel(), bits)].
    """
    check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise SurgeryError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing")
    flat = flat.to(torch.uint8)
    if bits == 8:
        return flat.clone()
    n = flat.numel()
    if n % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - n % 8)])
    chunks = flat.view(-1, 8).long()  # [k, 8]
    value = (chunks << (torch.arange(8, device=flat.device) * bits)).sum(1)  # disjoint fields: sum == OR
    out = (value[:, None] >> (torch.arange(bits, device=flat.device) * 8)) & 0xFF
    return out.to(torch.uint8).reshape(-1)[: packed_nbytes(n, bits)]


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack_codes`: the first `n` codes, uint8 [n]."""
    check_bits(bits)
    if packed.numel() != packed_nbytes(n, bits):
        raise SurgeryError(f"{packed.numel()} packed bytes cannot hold {n} codes of {bits} bits")
    mask = 2**bits - 1
    if bits == 8:
        return packed[:n]
    if 8 % bits == 0:  # fast path in uint8: 8/b codes per byte
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed[:, None] >> shifts) & mask).reshape(-1)[:n]
    if packed.numel() % bits:
        packed = torch.cat([packed, packed.new_zeros(bits - packed.numel() % bits)])
    by = packed.view(-1, bits).long()  # [k, bits] bytes of each 8-code run
    value = (by << (torch.arange(bits, device=packed.device) * 8)).sum(1)
    codes = (value[:, None] >> (torch.arange(8, device=packed.device) * bits)) & mask
    return codes.to(torch.uint8).reshape(-1)[:n]
