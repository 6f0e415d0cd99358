"""Command line for the fine-tuning recipe: `python -m finetune --model PATH --lora|--full --output DIR [...]`.

Each option's help is the matching line of `finetune.recipe.finetune`'s docstring, so the two cannot drift.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import re
import signal
import sys
import threading

from configuration_diff import ATTENTION_IMPLEMENTATIONS
from conversion.help import HelpFormatter

from .lora import SECOND_MAP_MODES
from .recipe import finetune, held_out_summary

# Options set by other means than `--name VALUE`, or not exposed on the command line.
_SPECIAL = {"mode", "resume", "training_args"}
_CHOICES = {"second_maps": SECOND_MAP_MODES, "attn_implementation": ATTENTION_IMPLEMENTATIONS}


def _docstring_help(function) -> dict[str, str]:
    """`name: text` entries of a Google-style "Args:" block, continuation lines joined."""
    helps: dict[str, str] = {}
    current = None
    args_block = inspect.getdoc(function).split("Args:", 1)[1]
    for line in args_block.splitlines():
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            current = match.group(1)
            helps[current] = match.group(2)
        elif line.startswith("        ") and current is not None:
            helps[current] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break  # the text after the block ("Returns ...")
    # argparse expands %-formats in help text
    return {name: text.replace("%", "%%") for name, text in helps.items()}


def build_parser() -> argparse.ArgumentParser:
    helps = _docstring_help(finetune)
    parser = argparse.ArgumentParser(
        prog="python -m finetune",
        description=inspect.getdoc(finetune).split("\n", 1)[0],
        formatter_class=HelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--lora", dest="mode", action="store_const", const="lora", help="train a LoRA adapter")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="train every parameter")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the last checkpoint in OUTPUT/checkpoints, or from the CHECKPOINT folder given",
    )
    for name, parameter in inspect.signature(finetune).parameters.items():
        if name in _SPECIAL:
            continue
        flag = "--" + name.replace("_", "-")
        required = parameter.default is inspect.Parameter.empty
        if parameter.default is False:
            parser.add_argument(flag, action="store_true", help=helps[name])
            continue
        annotation = str(parameter.annotation)
        kind = int if annotation.startswith("int") else float if annotation.startswith("float") else str
        default = None if required else parameter.default
        choices = _CHOICES.get(name)
        parser.add_argument(flag, type=kind, required=required, default=default, choices=choices, help=helps[name])
    return parser


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops a run as Ctrl-C does, saying what was kept


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    # The library logs through `logging`; the command line is where it is decided that those lines are shown.
    # One process of several (torchrun, accelerate) speaks for all: the others show warnings only.
    level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        metrics = finetune(**args)
    except (OSError, ValueError, ImportError) as error:  # missing folders or extras, bad checkpoints or options
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(error).split())}\n")
    except KeyboardInterrupt as interrupted:
        said = str(interrupted) or "interrupted; continue from the last checkpoint with --resume"
        parser.exit(130, f"{parser.prog}: {said}\n")
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
    logging.getLogger("finetune").info(held_out_summary(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
