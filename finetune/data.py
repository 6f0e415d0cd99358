"""A causal-LM code corpus from a folder of `.py` files: split by file, tokenised, packed into fixed blocks.

The held-out split is by file, not by block, so held-out perplexity measures code the model has not seen any
part of (a block split would leak the rest of a file into training). A file's side is decided by a hash of its
path relative to the folder: the split is the same on every machine and for every run, and adding or removing
files never moves the others.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Folders under a Python installation's stdlib path that hold other people's code, not the standard library.
_NOT_STDLIB = {"site-packages", "dist-packages", "__pycache__"}


def default_data_dir() -> Path:
    """The running Python's standard library (third-party packages below it are skipped by `python_files`)."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_files(root: str | Path) -> list[Path]:
    """Every `.py` file under `root`, sorted, skipping `site-packages`, `dist-packages` and `__pycache__`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist or is not a folder")
    files = sorted(
        path
        for path in root.rglob("*.py")
        if path.is_file() and not _NOT_STDLIB.intersection(path.relative_to(root).parts[:-1])
    )
    if not files:
        raise FileNotFoundError(f"no .py files under {root}")
    return files


def hash_fraction(text: str) -> float:
    """A number in [0, 1) fixed by `text`: the same on every machine."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def split_by_key(items: list, keys: list[float], eval_fraction: float) -> tuple[list, list]:
    """(train, held-out): the items whose key is below `eval_fraction` held out, each side non-empty, both in key
    order (a fixed shuffle)."""
    keyed = sorted(zip(keys, range(len(items))))
    held_out = [items[i] for key, i in keyed if key < eval_fraction]
    train = [items[i] for key, i in keyed if key >= eval_fraction]
    # Small sets can land on one side entirely; the lowest-keyed item is the deterministic one to move.
    if not held_out:
        held_out, train = train[:1], train[1:]
    elif not train:
        held_out, train = held_out[:-1], held_out[-1:]
    return train, held_out


def split_files(files: list[Path], *, root: str | Path, eval_fraction: float) -> tuple[list[Path], list[Path]]:
    """Split files into (train, held-out), about `eval_fraction` of the files held out, each side non-empty.

    Both lists come in hash order, a fixed shuffle: a token budget that takes files from the front then samples
    the whole library instead of its alphabetically first packages.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction ({eval_fraction}) must lie strictly between 0 and 1")
    if len(files) < 2:
        raise ValueError(f"need at least 2 .py files to hold one out, found {len(files)}")
    root = Path(root)
    # A file's key is its relative path's hash (its POSIX form, so Windows agrees).
    return split_by_key(files, [hash_fraction(path.relative_to(root).as_posix()) for path in files], eval_fraction)


def tokenize_files(
    files: list[Path], tokenizer: PreTrainedTokenizerBase, *, max_tokens: int | None = None
) -> tuple[list[int], list[Path]]:
    """Token ids of the files in order, each followed by the tokenizer's EOS, stopping once `max_tokens` are read;
    and the files read.

    The EOS between files marks a document boundary inside a packed block, as in pre-training corpora. Undecodable
    bytes are replaced rather than skipping the file: the standard library has a few deliberately odd encodings.
    """
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if not separator:
        logger.warning("the tokenizer has no EOS token; files are concatenated without a boundary token")
    ids: list[int] = []
    for count, path in enumerate(files, start=1):
        text = path.read_text(encoding="utf-8", errors="replace")
        # verbose=False: whole files are longer than the model's context on purpose; packing cuts them later.
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        ids.extend(separator)
        if max_tokens is not None and len(ids) >= max_tokens:
            return ids[:max_tokens], files[:count]
    return ids, files


class PackedBlocks(torch.utils.data.Dataset):
    """Consecutive `block_size`-token blocks of one token stream; the tail shorter than a block is dropped.

    Every item is a full block, so no padding or attention mask is needed and labels are the inputs (the model
    shifts them).
    """

    def __init__(self, ids: list[int], block_size: int):
        if block_size < 2:
            raise ValueError(f"block_size ({block_size}) must be at least 2")
        n_blocks = len(ids) // block_size
        self.blocks = torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block}

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()


@dataclass
class CodeCorpus:
    """Packed train and held-out blocks, and the files each was read from (within the token budgets)."""

    train: PackedBlocks
    held_out: PackedBlocks
    train_files: list[Path]
    held_out_files: list[Path]

    def summary(self) -> dict:
        return {
            "train_files": len(self.train_files),
            "held_out_files": len(self.held_out_files),
            "train_blocks": len(self.train),
            "held_out_blocks": len(self.held_out),
            "train_tokens": self.train.num_tokens,
            "held_out_tokens": self.held_out.num_tokens,
        }


def build_corpus(
    data_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    block_size: int,
    eval_fraction: float = 0.05,
    max_train_tokens: int | None = None,
    max_eval_tokens: int | None = None,
) -> CodeCorpus:
    """Train and held-out blocks from the `.py` files under `data_dir`, split by file (see `split_files`)."""
    files = python_files(data_dir)
    train_files, held_out_files = split_files(files, root=data_dir, eval_fraction=eval_fraction)
    train_ids, train_files = tokenize_files(train_files, tokenizer, max_tokens=max_train_tokens)
    held_out_ids, held_out_files = tokenize_files(held_out_files, tokenizer, max_tokens=max_eval_tokens)
    train, held_out = PackedBlocks(train_ids, block_size), PackedBlocks(held_out_ids, block_size)
    for name, blocks in (("training", train), ("held-out", held_out)):
        if len(blocks) == 0:
            raise ValueError(
                f"the {name} files of {data_dir} give fewer than block_size ({block_size}) tokens; "
                "use more files, a larger token budget or a smaller block size"
            )
    corpus = CodeCorpus(train, held_out, train_files, held_out_files)
    logger.info(f"code corpus from {data_dir}: {corpus.summary()}")
    return corpus
