"""A safetensors writer that streams: each tensor goes to disk as soon as it is converted.

`safetensors.torch.save_file` wants every tensor of a file at once and serialises them into one more buffer, about
twice a shard in memory. The conversion knows every output shape and dtype up front (it plans on meta tensors), so
each file's header can be written first and the data appended tensor by tensor. The files and the index are the
ones `save_pretrained` writes.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConversionError

from .sources import SAFETENSORS_DTYPES

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def parse_size(size: int | str) -> int:
    """`"5GB"`, `"500MB"` or a byte count -> bytes (decimal units, as `save_pretrained` counts)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    try:
        for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
            if text.endswith(unit):
                value = int(float(text[: -len(unit)]) * factor)
                break
        else:
            value = int(text)
    except (ValueError, OverflowError):  # not a number, or inf / nan
        value = 0
    if value <= 0:
        raise ConversionError(f"max_shard_size {size!r} is not a positive size: write it like 5GB, 500MB or 1000000.")
    return value


def partition(entries: list[Entry], max_shard_size: int) -> list[list[Entry]]:
    """Split the planned tensors, in order, into files of at most `max_shard_size` bytes (a larger tensor alone)."""
    files: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if files[-1] and size + entry.nbytes > max_shard_size:
            files.append([])
            size = 0
        files[-1].append(entry)
        size += entry.nbytes
    return files


def file_names(count: int) -> list[str]:
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class StreamingWriter:
    """Writes planned tensors, in plan order, into safetensors files under `folder`; `close` writes the index."""

    def __init__(self, folder: Path, entries: list[Entry], max_shard_size: int):
        self.folder = folder
        self.files = partition(entries, max_shard_size)
        self.names = file_names(len(self.files))
        self.order = [(file_index, entry) for file_index, file in enumerate(self.files) for entry in file]
        self.position = 0
        self.handle = None
        self.open_index = -1

    def write(self, key: str, tensor: torch.Tensor) -> None:
        file_index, entry = self.order[self.position]
        if key != entry.key or tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise RuntimeError(
                f"tensor {key} {tuple(tensor.shape)} {tensor.dtype} does not match the plan's next entry {entry}"
            )
        if file_index != self.open_index:
            self._open(file_index)
        if tensor.numel():
            # A byte view of the tensor's own memory: no serialised copy.
            self.handle.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.position += 1

    def _open(self, file_index: int) -> None:
        if self.handle is not None:
            self.handle.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for entry in self.files[file_index]:
            header[entry.key] = {
                "dtype": _DTYPE_NAMES[entry.dtype],
                "shape": list(entry.shape),
                "data_offsets": [offset, offset + entry.nbytes],
            }
            offset += entry.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors itself writes it
        self.handle = open(self.folder / self.names[file_index], "wb")
        self.handle.write(struct.pack("<Q", len(encoded)))
        self.handle.write(encoded)
        self.open_index = file_index

    def close(self) -> list[str]:
        """Finish the last file and write the index (sharded output only); returns the file names."""
        if self.position != len(self.order):
            raise RuntimeError(f"{len(self.order) - self.position} planned tensors were never written")
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if len(self.files) > 1:
            weight_map = {entry.key: name for name, file in zip(self.names, self.files) for entry in file}
            total = sum(entry.nbytes for file in self.files for entry in file)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return self.names

    def abort(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
