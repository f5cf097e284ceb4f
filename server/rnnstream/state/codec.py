"""Conversion between packed state bytes and batched state tensors.

One session's state is S tensors of shape (num_layers, hidden), S = 2 for an
LSTM (h then c) and 1 for a GRU, packed as one C-order float32 array of shape
(S, num_layers, hidden) in little-endian byte order: S * num_layers * hidden * 4
bytes. A batch of B states is stacked into S tensors of shape
(num_layers, B, hidden), the layout torch.nn.LSTM and torch.nn.GRU take.
"""

from __future__ import annotations

import sys

import torch

DTYPE = "float32"

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("rnnstream packs state as little-endian float32 and needs a little-endian host")


def state_shape(state_tensors: int, num_layers: int, hidden_size: int) -> tuple[int, int, int]:
    return (state_tensors, num_layers, hidden_size)


def state_nbytes(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * 4


def zero_state(shape: tuple[int, ...]) -> bytes:
    return bytes(state_nbytes(shape))


def stack_states(blobs: list[bytes], shape: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Unpack B blobs of `shape` (S, L, H) into S tensors of shape (L, B, H) on device."""
    batch = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.float32)
    batch = batch.view(len(blobs), *shape)  # (B, S, L, H)
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    stacked = batch.permute(1, 2, 0, 3)  # (S, L, B, H)
    return tuple(stacked[i].contiguous() for i in range(shape[0]))


def split_states(state: tuple[torch.Tensor, ...]) -> list[bytes]:
    """Pack S tensors of shape (L, B, H) into B blobs of shape (S, L, H)."""
    batch = torch.stack(state).permute(2, 0, 1, 3).contiguous()  # (B, S, L, H)
    data = batch.to("cpu", torch.float32).numpy().tobytes()
    size = len(data) // batch.shape[0]
    return [data[i * size : (i + 1) * size] for i in range(batch.shape[0])]
