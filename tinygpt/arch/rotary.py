"""Rotary position embeddings (RoPE, Su et al. 2021), exactly as Hugging Face's Llama / Qwen2 / Mistral / GPT-NeoX.

Config fields read (TransformerLens names; defaults when a field is absent):

    d_head                 head width
    rotary_dim             dims rotated per head (None = d_head; GPT-NeoX/Pythia: rotary_pct * d_head), even
    rotary_base            HF `rope_theta` (10000.0)
    rotary_adjacent_pairs  False: HF / NeoX "rotate_half" layout (dim i pairs with i + rotary_dim/2);
                           True: GPT-J layout (dims 2i and 2i+1 form a pair)
    rope_scaling           None, or HF's dict: {"rope_type": "linear", "factor"} or {"rope_type": "llama3",
                           "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
                           (`"type"` is accepted for "rope_type"; "default" = None); other types are refused

With r = rotary_dim, inverse frequencies f_j = rotary_base^(-2j / r) for j < r/2 (then rescaled by
`rope_scaling`), and per position p the angles a_j = p * f_j (fp32), a head vector x [d_head] becomes

    rotate_half layout:  y[:r] = x[:r] * cos(a ++ a) + rotate_half(x[:r]) * sin(a ++ a),
                         rotate_half(u) = (-u[r/2:], u[:r/2]);  y[r:] = x[r:]   (partial rotary: passed through)
    adjacent layout:     (y[2j], y[2j+1]) = (x[2j] cos a_j - x[2j+1] sin a_j, x[2j+1] cos a_j + x[2j] sin a_j)

cos/sin are computed in fp32 and cast to x's dtype before the products, as Hugging Face does, so bf16 models match
HF's bf16 arithmetic too. The cos/sin tables are cached per (device, dtype) and grown on demand; they are plain
attributes, not buffers, so the state_dict is unchanged by rotary (nothing is learned).

The attention module calls `Rotary.forward(x, pos)` on the queries and keys after `hook_q` / `hook_k` and passes
the results through `hook_rot_q` / `hook_rot_k` (tinygpt.model), both [batch, pos, heads, d_head].
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from tinygpt.config import ConfigError, GPTConfig

__all__ = ["ROPE_TYPES", "Rotary", "inv_frequencies", "normalize_rope_scaling"]

ROPE_TYPES = ("default", "linear", "llama3")
_KEYS = {
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


def normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """A validated copy of an HF `rope_scaling` dict with "rope_type" set, or None for plain RoPE.

    Raises:
        ConfigError: naming `rope_scaling` and the unsupported type or missing key.
    """
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be a dict like HF's, got {type(scaling).__name__}")
    s = dict(scaling)
    kind = s.pop("rope_type", s.pop("type", "default"))
    s.pop("rope_theta", None)  # transformers >= 5 keeps rope_theta here; ours is rotary_base
    s.pop("partial_rotary_factor", None)  # ours is rotary_dim
    if kind not in ROPE_TYPES:
        raise ConfigError(
            f"rope_scaling type {kind!r} is not supported (tinygpt has {', '.join(ROPE_TYPES)}); a model using it "
            "cannot be expressed exactly"
        )
    if kind == "default":
        return None
    missing = sorted(_KEYS[kind] - set(s))
    if missing:
        raise ConfigError(f"rope_scaling of type {kind!r} needs {missing}")
    extra = sorted(set(s) - _KEYS[kind])
    if extra:
        raise ConfigError(f"rope_scaling of type {kind!r} has keys tinygpt does not implement: {extra}")
    if kind == "llama3" and s["high_freq_factor"] == s["low_freq_factor"]:
        raise ConfigError("rope_scaling llama3 needs high_freq_factor != low_freq_factor")
    return {"rope_type": kind, **{k: s[k] for k in sorted(_KEYS[kind])}}


def inv_frequencies(rotary_dim: int, base: float, scaling: dict[str, Any] | None = None) -> Tensor:
    """The [rotary_dim // 2] fp32 inverse frequencies, computed with HF's operations (bitwise the same values)."""
    # explicit CPU: a model built under `with torch.device("meta")` (tinygpt's importer) still gets real values
    steps = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float)
    inv = 1.0 / (base ** (steps / rotary_dim))
    s = normalize_rope_scaling(scaling)
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    # llama3 (Llama 3.1): long wavelengths divided by factor, short ones kept, a smooth blend in between
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """Rotary position embedding of queries or keys (see the module docstring).

    Args:
        cfg: reads d_head, rotary_dim, rotary_base, rotary_adjacent_pairs, rope_scaling.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d_head = cfg.d_head
        dim = getattr(cfg, "rotary_dim", None) or d_head
        if dim % 2 or not 0 < dim <= d_head:
            raise ConfigError(f"rotary_dim must be even and in (0, d_head={d_head}], got {dim}")
        self.d_head, self.rotary_dim = d_head, dim
        self.base = float(getattr(cfg, "rotary_base", 10000.0))
        self.adjacent = bool(getattr(cfg, "rotary_adjacent_pairs", False))
        self.scaling = normalize_rope_scaling(getattr(cfg, "rope_scaling", None))
        self._inv = inv_frequencies(dim, self.base, self.scaling)  # [dim/2] fp32, CPU
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def extra_repr(self) -> str:
        return f"rotary_dim={self.rotary_dim}, base={self.base}, adjacent={self.adjacent}, scaling={self.scaling}"

    def tables(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin for positions 0..n-1 (at least), each [n', rotary_dim] in `dtype` (computed in fp32)."""
        key = (torch.device(device), dtype)
        cached = self._tables.get(key)
        if cached is not None and cached[0].shape[0] >= n:
            return cached
        size = max(64, 1 << max(n - 1, 1).bit_length())  # grow geometrically
        inv = self._inv.to(device)
        freqs = torch.arange(size, device=device).float()[:, None] * inv  # [size, dim/2]: p * f_j, as HF
        emb = freqs.repeat_interleave(2, -1) if self.adjacent else torch.cat((freqs, freqs), -1)
        self._tables[key] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return self._tables[key]

    def forward(self, x: Tensor, pos: Tensor | int = 0) -> Tensor:
        """Rotate x.

        Args:
            x: [batch, pos, heads, d_head] queries or keys.
            pos: integer positions [pos] or [batch, pos] (e.g. a KV cache's offset onward), or an int `start`
                meaning positions start .. start + pos - 1 (no device sync needed).

        Returns:
            [batch, pos, heads, d_head], x's dtype.
        """
        t = x.shape[1]
        if isinstance(pos, int):
            cos, sin = self.tables(pos + t, x.device, x.dtype)
            cos, sin = cos[pos : pos + t], sin[pos : pos + t]  # [t, r]
        else:
            n = int(pos.max()) + 1 if pos.numel() else 1
            cos, sin = self.tables(n, x.device, x.dtype)
            cos, sin = cos[pos], sin[pos]  # [t, r] or [b, t, r]
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        r = self.rotary_dim
        rot = x[..., :r] if r < self.d_head else x
        if self.adjacent:
            pairs = rot.unflatten(-1, (r // 2, 2))
            turned = torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)
        else:
            turned = torch.cat((-rot[..., r // 2 :], rot[..., : r // 2]), -1)
        out = rot * cos + turned * sin
        return torch.cat((out, x[..., r:]), -1) if r < self.d_head else out
