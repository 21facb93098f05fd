"""RoPE variants (default, linear, dynamic NTK, YaRN, Llama-3) read from Hugging Face configs.

`rope_parameters_from_hf` turns a `config.json` dict (transformers 5.x `rope_parameters` or 4.x
`rope_theta` + `rope_scaling`) into a frozen `RopeParameters`; `inv_freq_and_scaling` gives the
inverse frequencies and the attention scaling exactly as transformers' `ROPE_INIT_FUNCTIONS`
(`modeling_rope_utils.py`, 5.23) compute them; `cos_sin` builds the tables the decoder applies,
in the layout of `vimrag_jax.models.qwen3.rope_cos_sin` (two copies of each frequency, both
tables multiplied by the attention scaling, as transformers' rotary embeddings do).

Dynamic NTK ("dynamic") depends on the sequence length. transformers recomputes the frequencies
inside `forward` from `seq_len = max(position_ids) + 1` whenever that exceeds the longest length
seen so far (and falls back to the plain frequencies once a call is back under
`max_position_embeddings`), which makes its output depend on earlier calls. Here the frequencies
are a pure function of the `seq_len` passed in: up to `max_position_embeddings` they are the
default ones; beyond, the base grows as `theta * (factor * seq_len / max_pos - (factor - 1)) **
(dim / (dim - 2))`. That equals transformers on a single call, or on calls with non-decreasing
lengths. `seq_len` may be a traced JAX scalar (e.g. `positions.max() + 1` inside jit); note that
during KV-cache decoding keys already in the cache keep the rotation of the length they were
written at, as in transformers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
DEFAULT_THETA = 10_000.0  # transformers' `default_theta` when a config names none


@dataclasses.dataclass(frozen=True)
class RopeParameters:
    """One global RoPE setting; field names and meanings follow transformers' `rope_parameters`.

    `max_position_embeddings` is the model's (not a RoPE field in HF, but dynamic NTK and YaRN's
    default factor read it). `mrope_section` / `mrope_interleaved` are carried for Qwen3-VL's
    multimodal RoPE and do not change the frequencies.
    """

    rope_type: str = "default"
    rope_theta: float = DEFAULT_THETA
    max_position_embeddings: int = 32768
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    mrope_section: tuple[int, ...] | None = None
    mrope_interleaved: bool = False

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise NotImplementedError(
                f"RoPE type {self.rope_type!r} is not supported; supported: {ROPE_TYPES}."
            )
        if self.rope_type in ("linear", "dynamic", "llama3") and self.factor is None:
            raise ValueError(f"RoPE type {self.rope_type!r} needs a `factor`.")
        if self.rope_type in ("yarn", "llama3") and self.original_max_position_embeddings is None:
            raise ValueError(
                f"RoPE type {self.rope_type!r} needs original_max_position_embeddings."
            )
        if self.rope_type == "llama3" and (
            self.low_freq_factor is None or self.high_freq_factor is None
        ):
            raise ValueError("RoPE type 'llama3' needs low_freq_factor and high_freq_factor.")

    def to_hf(self) -> dict[str, Any]:
        """The transformers 5.x `rope_parameters` dict (fields left at None are omitted)."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("rope_type", "rope_theta", "max_position_embeddings"):
                continue
            if field.name == "truncate" and (value or self.rope_type != "yarn"):
                continue
            if field.name == "mrope_interleaved" and not value:
                continue
            if value is not None:
                out[field.name] = list(value) if isinstance(value, tuple) else value
        return out


_FLOAT_KEYS = (
    "factor",
    "attention_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "low_freq_factor",
    "high_freq_factor",
)
_KNOWN_KEYS = frozenset(
    {"rope_type", "type", "rope_theta", "partial_rotary_factor", "original_max_position_embeddings"}
    | set(_FLOAT_KEYS)
    | {"truncate", "mrope_section", "mrope_interleaved"}
)


def rope_parameters_from_hf(hf_config: dict[str, Any]) -> RopeParameters:
    """Reads the RoPE setting of a text-model `config.json` dict the way transformers 5.23 does.

    Accepts the 5.x layout (`rope_parameters: {rope_type, rope_theta, ...}`) and the 4.x one
    (top-level `rope_theta`, optional `rope_scaling` with `type` or `rope_type`); a `rope_scaling`
    dict wins over `rope_parameters`, and a theta inside the dict over the top-level one, as in
    transformers. For "yarn" and "llama3", `original_max_position_embeddings` is the top-level
    one if the config has it (transformers gives it priority), else the dict's, else
    `max_position_embeddings`. Raises NotImplementedError for
    RoPE types outside `ROPE_TYPES` (e.g. "longrope"), per-layer-type RoPE settings and
    `partial_rotary_factor != 1`.
    """
    if not isinstance(hf_config, dict):
        raise TypeError(f"Expected a config.json dict, got {type(hf_config).__name__}.")
    params = dict(hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {})
    layer_types = set(hf_config.get("layer_types") or ())
    if layer_types & set(params):
        raise NotImplementedError(
            f"Per-layer-type RoPE settings are not supported, got rope_parameters {params}."
        )
    unknown = sorted(set(params) - _KNOWN_KEYS)
    if unknown:
        raise NotImplementedError(f"Unsupported RoPE fields {unknown} in {params}.")
    partial = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor"))
    if partial is not None and partial != 1.0:
        raise NotImplementedError(f"partial_rotary_factor={partial} is not supported (only 1).")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", hf_config.get("rope_theta")) or DEFAULT_THETA
    max_pos = int(hf_config.get("max_position_embeddings", 32768))
    original = params.get("original_max_position_embeddings")
    if rope_type in ("yarn", "llama3"):
        # transformers re-standardises when computing, and a top-level value (Phi-3 style) wins.
        original = hf_config.get("original_max_position_embeddings", original or max_pos)
    floats = {key: None if params.get(key) is None else float(params[key]) for key in _FLOAT_KEYS}
    section = params.get("mrope_section")
    return RopeParameters(
        rope_type=rope_type,
        rope_theta=float(theta),
        max_position_embeddings=max_pos,
        original_max_position_embeddings=None if original is None else int(original),
        truncate=bool(params.get("truncate", True)),
        mrope_section=None if section is None else tuple(int(s) for s in section),
        mrope_interleaved=bool(params.get("mrope_interleaved", False)),
        **floats,
    )


def _plain_inv_freq(theta: Any, dim: int, xp: Any) -> Any:
    return 1.0 / (theta ** (xp.arange(0, dim, 2, dtype=xp.float32) / dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(p: RopeParameters, dim: int) -> tuple[np.ndarray, float]:
    factor = p.factor
    if factor is None:  # DeepSeek-style configs give the ratio implicitly
        factor = p.max_position_embeddings / p.original_max_position_embeddings
    attention_factor = p.attention_factor
    if attention_factor is None:
        if p.mscale and p.mscale_all_dim:
            attention_factor = _yarn_mscale(factor, p.mscale) / _yarn_mscale(
                factor, p.mscale_all_dim
            )
        else:
            attention_factor = _yarn_mscale(factor)
    # transformers reads these with `or`, so 0 also means "use the default".
    beta_fast, beta_slow = p.beta_fast or 32, p.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength fits `rotations` times into the original context.
        length = p.original_max_position_embeddings
        return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(p.rope_theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    pos_freqs = p.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    interpolated, extrapolated = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
    inv_freq = interpolated * (1 - extrapolation) + extrapolated * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def _llama3(p: RopeParameters, dim: int) -> np.ndarray:
    inv_freq = _plain_inv_freq(p.rope_theta, dim, np)
    old_len = p.original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / p.low_freq_factor, old_len / p.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = np.where(wavelen > low_wavelen, inv_freq / p.factor, inv_freq)
    smooth = (old_len / wavelen - p.low_freq_factor) / (p.high_freq_factor - p.low_freq_factor)
    smoothed = (1 - smooth) * scaled / p.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def inv_freq_and_scaling(
    params: RopeParameters, head_dim: int, *, seq_len: int | jax.Array | None = None
) -> tuple[np.ndarray | jax.Array, float]:
    """Inverse frequencies `float32[head_dim // 2]` and the cos/sin (attention) scaling.

    `seq_len` only matters for "dynamic" (see the module docstring); None means
    `max_position_embeddings`. A traced `seq_len` gives a `jax.Array`; otherwise a numpy array.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"RoPE needs a positive even head_dim, got {head_dim}.")
    p, dim = params, head_dim
    if p.rope_type == "default":
        return _plain_inv_freq(p.rope_theta, dim, np).astype(np.float32), 1.0
    if p.rope_type == "linear":
        return (_plain_inv_freq(p.rope_theta, dim, np) / np.float32(p.factor)), 1.0
    if p.rope_type == "yarn":
        return _yarn(p, dim)
    if p.rope_type == "llama3":
        return _llama3(p, dim), 1.0
    # dynamic NTK
    max_pos = p.max_position_embeddings
    traced = isinstance(seq_len, jax.Array)
    xp = jnp if traced else np
    length = max_pos if seq_len is None else xp.maximum(seq_len, max_pos)
    growth = (p.factor * length / max_pos - (p.factor - 1)) ** (dim / (dim - 2))
    theta = p.rope_theta * growth
    if not traced:
        theta = float(theta)  # transformers computes the grown base in Python floats
    return _plain_inv_freq(theta, dim, xp).astype(xp.float32), 1.0


def cos_sin(
    positions: jax.Array, inv_freq: np.ndarray | jax.Array, scaling: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Tables `cos, sin: float32[*positions.shape, 2 * len(inv_freq)]`, times `scaling`.

    The frequencies are repeated (`[f, f]`), matching `decoder.apply_rope`'s rotate-half pairing.
    """
    freqs = jnp.asarray(positions).astype(jnp.float32)[..., None] * jnp.asarray(
        inv_freq, jnp.float32
    )
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles) * scaling, jnp.sin(angles) * scaling
