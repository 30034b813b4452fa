"""The byte codec: any bytes to token ids and back, exactly.

Ids 0..255 are the byte values; 256..259 are the specials. The codec never decodes text:
invalid UTF-8 goes in and comes out unchanged. Turning bytes into text is the collector's job.
"""

from __future__ import annotations

import torch

BOS, EOS, PAD, SEP = 256, 257, 258, 259
SPECIALS = {"BOS": BOS, "EOS": EOS, "PAD": PAD, "SEP": SEP}


def encode(data: bytes | bytearray | memoryview | str, *, bos: bool = False) -> torch.Tensor:
    """Bytes (or text, as UTF-8) to a 1-D long tensor of ids."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if raw:
        ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    else:
        ids = torch.empty(0, dtype=torch.long)
    if bos:
        ids = torch.cat([torch.tensor([BOS]), ids])
    return ids


def decode(ids: torch.Tensor | list[int]) -> bytes:
    """Ids back to bytes; specials are dropped (they carry no byte)."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    for v in values:
        if not 0 <= v < 260:
            raise ValueError(f"id {v} outside the vocabulary 0..259")
    return bytes(v for v in values if v < 256)
