"""Instruction and preference datasets for `python -m finetune`, trained through TRL.

A dataset is a JSON, JSONL or Parquet file, a folder written by `datasets`' `save_to_disk`, or a Hub id (online).
Its columns say what it holds, in the formats TRL takes:

- `text`: plain documents, trained on every token (as the code corpus is);
- `prompt` and `completion`: the loss is on the completion's tokens only;
- `messages`: chat, rendered by the tokenizer's chat template; the loss is on the last assistant message, everything
  before it is the prompt (a chat template needs `{% generation %}` markers for a loss on every assistant turn, and
  few have them);
- `prompt`, `chosen` and `rejected`: preference pairs, for `dpo`.

The held-out rows are the dataset's own `test` (or `validation`) split when it has one, else about `eval_fraction`
of the rows chosen by a hash of each row's content: the same on every machine, and a row's side never depends on the
others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers.utils import logging

from .data import hash_fraction, split_by_key

logger = logging.get_logger(__name__)

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# A dataset's kind, by the columns it has (the first match wins).
KINDS = {
    "preference": ("prompt", "chosen", "rejected"),
    "prompt-completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
}
HELD_OUT_SPLITS = ("test", "validation")


def is_dataset(data: str | Path) -> bool:
    """Whether `data` names a dataset rather than a folder of `.py` files."""
    path = Path(data).expanduser()
    if path.is_file():
        return True  # load_rows refuses a suffix it cannot read, naming the ones it can
    if path.is_dir():
        return any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))
    text = str(data)
    return text.count("/") == 1 and not text.startswith((".", "/", "~"))  # a Hub id


def load_rows(data: str | Path):
    """The dataset's training rows, and its held-out split if it has one (else None)."""
    import datasets

    path = Path(data).expanduser()
    if path.is_file():
        builder = FILE_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"data {data} is a file but not a dataset this recipe reads: pass a {', '.join(FILE_FORMATS)} file, "
                "a folder written by datasets' save_to_disk, or a folder of .py files"
            )
        loaded = datasets.load_dataset(builder, data_files=str(path))
    elif path.is_dir():
        loaded = datasets.load_from_disk(str(path))
    else:
        try:
            loaded = datasets.load_dataset(str(data))
        except Exception as error:  # offline, unknown or private: the Hub client's many error types
            raise FileNotFoundError(
                f"data {data} is neither a local folder or file nor a dataset on the Hub that could be loaded "
                f"({type(error).__name__}): pass a folder of .py files, a JSON/JSONL/Parquet file or a saved dataset"
            ) from error
    if isinstance(loaded, datasets.Dataset):
        return loaded, None
    if "train" not in loaded:
        raise ValueError(f"dataset {data} has no train split (splits: {', '.join(loaded)}): save one named train")
    held_out = next((loaded[name] for name in HELD_OUT_SPLITS if name in loaded), None)
    return loaded["train"], held_out


def dataset_kind(columns: list[str], *, data: str | Path) -> str:
    for kind, needed in KINDS.items():
        if set(needed) <= set(columns):
            return kind
    formats = "; ".join(" + ".join(needed) for needed in KINDS.values())
    raise ValueError(f"dataset {data} has columns {', '.join(columns)}; a dataset needs one of: {formats}")


def last_turn_as_completion(row: dict) -> dict:
    """A `messages` row as conversational prompt and completion: the last assistant message is the completion."""
    messages = row["messages"]
    last = max((i for i, message in enumerate(messages) if message["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise ValueError(
            f"a messages row needs an assistant message after the first message: {json.dumps(messages)[:200]}"
        )
    return {"prompt": messages[:last], "completion": [messages[last]]}


def trl_trainer(*, dpo: bool, schedule: type) -> tuple[type, type]:
    """TRL's DPOTrainer or SFTTrainer with the `schedule` mixin first, and its config class."""
    try:
        import trl
    except ImportError as error:
        raise ImportError(f"training on a dataset uses TRL ({error}): pip install -e '.[trl]'") from None
    trainer, config = (trl.DPOTrainer, trl.DPOConfig) if dpo else (trl.SFTTrainer, trl.SFTConfig)
    return type(f"Recipe{trainer.__name__}", (schedule, trainer), {}), config


@dataclass
class InstructionData:
    """Training and held-out rows in one of TRL's formats, and the kind of data they came as."""

    train: object  # datasets.Dataset
    held_out: object
    kind: str

    def summary(self) -> dict:
        return {"data_kind": self.kind, "train_examples": len(self.train), "held_out_examples": len(self.held_out)}


def build_instruction_data(
    data: str | Path, *, eval_fraction: float, max_eval_examples: int, preference: bool, has_chat_template: bool
) -> InstructionData:
    """The rows of `data`, checked for the training asked for (`preference`: DPO), split into train and held out."""
    train, held_out = load_rows(data)
    kind = dataset_kind(train.column_names, data=data)
    if preference and kind != "preference":
        raise ValueError(
            f"--dpo needs preference data (prompt, chosen and rejected columns); {data} has "
            f"{', '.join(train.column_names)}"
        )
    if kind == "preference" and not preference:
        raise ValueError(f"{data} holds preference pairs (prompt, chosen, rejected): pass --dpo to train on them")
    if kind == "messages" and not has_chat_template:
        raise ValueError(
            f"{data} holds chat messages but the tokenizer has no chat template: use a model whose tokenizer has one, "
            "or prompt and completion columns"
        )
    if held_out is None:
        if len(train) < 2:
            raise ValueError(f"dataset {data} has {len(train)} row; at least 2 are needed to hold one out")
        keys = [hash_fraction(json.dumps(row, sort_keys=True, default=str)) for row in train]
        kept, held = split_by_key(list(range(len(train))), keys, eval_fraction)
        train, held_out = train.select(kept), train.select(held)
    held_out = held_out.select(range(min(len(held_out), max_eval_examples)))
    if kind == "messages":
        train, held_out = (rows.map(last_turn_as_completion, remove_columns=rows.column_names)
                           for rows in (train, held_out))
    keep = KINDS[kind] if kind != "messages" else KINDS["prompt-completion"]
    train, held_out = (rows.select_columns(list(keep)) for rows in (train, held_out))
    result = InstructionData(train, held_out, kind)
    logger.info(f"{kind} dataset from {data}: {result.summary()}")
    return result
