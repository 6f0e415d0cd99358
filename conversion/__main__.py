"""Command line: `python -m conversion [SOURCE] [OUTPUT] [options]`, also installed as `diffllama-convert`."""

import argparse
import inspect
import logging as std_logging
import re
import signal
import sys
import threading
from pathlib import Path

from transformers.utils import logging

from . import sources
from .convert import DTYPES, convert
from .errors import ConversionError, ConversionInterrupted
from .help import HelpFormatter
from .weight_map import DEFAULT_WIDENED_INIT, STRATEGIES, WIDENED_INITS


def _docstring_args(function) -> dict[str, str]:
    """The `Args:` entries of a Google-style docstring, so the API and the CLI share one text."""
    doc = inspect.getdoc(function)
    block = doc.split("Args:", 1)[1].split("Returns:", 1)[0]
    entries = re.split(r"\n(?=\s{4}\w+:)", block.strip("\n"))
    return {name.strip(): " ".join(text.split()) for name, text in (entry.split(":", 1) for entry in entries)}


def parser() -> argparse.ArgumentParser:
    helps = _docstring_args(convert)
    summary = inspect.getdoc(convert).split("Args:", 1)[0].strip()
    cli = argparse.ArgumentParser(prog="python -m conversion", description=summary, formatter_class=HelpFormatter)
    # Two optional positionals: with one path given, `main` decides whether it names the source or the output.
    cli.add_argument("source", nargs="?", metavar="SOURCE", help=helps["source"])
    cli.add_argument("output", nargs="?", metavar="OUTPUT", help=helps["output"])
    cli.add_argument(
        "-o",
        "--output",
        dest="output_option",
        metavar="OUTPUT",
        help="OUTPUT as an option, the way to name it when SOURCE is left to its default.",
    )
    cli.add_argument("--strategy", choices=STRATEGIES, default="v2", help=helps["strategy"])
    preserve = cli.add_mutually_exclusive_group()
    preserve.add_argument("--preserve", action="store_true", default=None, help=helps["preserve"])
    preserve.add_argument(
        "--no-preserve",
        dest="preserve",
        action="store_false",
        help="Do not preserve the source's function: the paper's initialisation of the new attention maps.",
    )
    cli.add_argument("--dtype", choices=list(DTYPES), help=helps["dtype"])
    cli.add_argument("--overwrite", action="store_true", help=helps["overwrite"])
    cli.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="Do not reload the result to check it. By default the converted model is reloaded and its parameter "
        "counts, held-out perplexity and a greedy generation are printed beside the source's.",
    )
    cli.add_argument("--max-shard-size", default="5GB", help=helps["max_shard_size"])
    cli.add_argument("--seed", type=int, default=0, help=helps["seed"])
    cli.add_argument("--init", choices=WIDENED_INITS, default=DEFAULT_WIDENED_INIT, help=helps["init"])
    cli.add_argument("--no-progress", dest="progress", action="store_false", help="Hide the progress bars.")
    cli.add_argument("--debug", action="store_true", help="Show full tracebacks and transformers' own log.")
    return cli


def _paths(args) -> tuple[str | None, str | None]:
    """(source, output) from the positionals and `--output`.

    A lone path is the source when it names an existing checkpoint, and the output when it is an existing folder of
    anything else or a new bare name. A new path that reads as a checkpoint (a Hub id, a .gguf name, a path with a
    separator) is a missing source: an uncached Hub id or a typo must not become the output of a conversion of the
    default model.
    """
    if args.output_option is not None:
        if args.output is not None:
            raise ConversionError(
                f"OUTPUT given twice ({args.output} and --output {args.output_option}): give one of them."
            )
        return args.source, args.output_option
    if args.output is not None or args.source is None:
        return args.source, args.output
    if sources.looks_like_source(args.source):
        return args.source, None
    if not Path(args.source).expanduser().exists() and sources.names_a_checkpoint(args.source):
        try:
            sources.resolve(args.source)
        except ConversionError as missing:
            raise ConversionError(
                f"{missing} One path alone is read as the SOURCE when it looks like a checkpoint; to convert the "
                f"default model into a new folder {args.source}, run `python -m conversion --output {args.source}`."
            ) from None
    return None, args.source


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: no temporary folder is left behind


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    try:
        source, output = _paths(args)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    # Our progress and results at INFO; transformers' own loading chatter only with --debug.
    handler = std_logging.StreamHandler(sys.stderr)
    handler.setFormatter(std_logging.Formatter("%(message)s"))
    ours = std_logging.getLogger(__package__)
    saved = ours.level, ours.propagate  # main() may run in a host process (tests, notebooks): put them back after
    ours.addHandler(handler)
    ours.setLevel(std_logging.DEBUG if args.debug else std_logging.INFO)
    ours.propagate = False
    if args.debug:
        logging.set_verbosity_info()
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None

    options = dict(
        source=source,
        output=output,
        strategy=args.strategy,
        preserve=args.preserve,
        dtype=args.dtype,
        overwrite=args.overwrite,
        verify=args.verify,
        max_shard_size=args.max_shard_size,
        seed=args.seed,
        init=args.init,
        progress=args.progress,
    )
    try:
        convert(**options)
    except ConversionError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ConversionInterrupted as interrupted:
        print(interrupted, file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the conversion had a temporary folder
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except Exception as error:  # an unexpected failure: one line, the traceback on request
        if args.debug:
            raise
        print(f"error: {type(error).__name__}: {error} (run again with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
        ours.removeHandler(handler)
        ours.setLevel(saved[0])
        ours.propagate = saved[1]
    return 0


if __name__ == "__main__":
    sys.exit(main())
