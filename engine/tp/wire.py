"""One step's tensors as one byte buffer, so a step costs rank 0 one small pipe message per worker
(the layout) and one broadcast (the bytes), whatever the number of tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

ALIGN = 16  # every tensor starts at a multiple of this, so a uint8 slice views as any dtype

TensorSpec = tuple[str, tuple[int, ...]] | None  # (dtype name, shape); None = the tensor is absent


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= s
    return n


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def specs_of(tensors: Sequence[torch.Tensor | None]) -> list[TensorSpec]:
    """The layout of ``tensors`` (known before any byte is packed, so it can be sent first)."""
    return [None if t is None else (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for t in tensors]


def pack(tensors: Sequence[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """The bytes of a list of tensors (some possibly None) on ``device``, laid out as ``specs_of``
    describes them."""
    parts: list[torch.Tensor] = []
    for t in tensors:
        if t is None:
            continue
        t = t.to(device).contiguous()
        raw = t.reshape(-1).view(torch.uint8)
        pad = _padded(raw.numel()) - raw.numel()
        parts.append(raw)
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8, device=device))
    if not parts:
        return torch.zeros(ALIGN, dtype=torch.uint8, device=device)
    return torch.cat(parts)


def buffer_size(specs: Sequence[TensorSpec]) -> int:
    total = sum(_padded(_nbytes(getattr(torch, s[0]), s[1])) for s in specs if s is not None)
    return total or ALIGN


def unpack(specs: Sequence[TensorSpec], buf: torch.Tensor) -> list[torch.Tensor | None]:
    """Views into ``buf`` laid out as ``specs`` (no copies)."""
    out: list[torch.Tensor | None] = []
    offset = 0
    for s in specs:
        if s is None:
            out.append(None)
            continue
        dtype = getattr(torch, s[0])
        n = _nbytes(dtype, s[1])
        out.append(buf[offset : offset + n].view(dtype).view(s[1]))
        offset += _padded(n)
    return out


def step_tensors(
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    meta: object,
    logits_indices: torch.Tensor | None,
) -> tuple[list[torch.Tensor | None], dict[str, object], list[str]]:
    """Split a step into its tensors, its plain metadata fields and the tensor fields' names.

    Fields are read from the AttentionMetadata dataclass itself, so a field added to the contract
    travels without a change here."""
    import dataclasses

    names: list[str] = []
    tensors: list[torch.Tensor | None] = [input_ids, positions, logits_indices]
    extras: dict[str, object] = {}
    for f in dataclasses.fields(meta):  # type: ignore[arg-type]
        value = getattr(meta, f.name)
        if value is None or isinstance(value, torch.Tensor):
            names.append(f.name)
            tensors.append(value)
        else:
            extras[f.name] = value
    return tensors, extras, names
