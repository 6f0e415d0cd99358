"""Command line: `python -m conversion [SOURCE] OUTPUT [options]`, also installed as `diffllama-convert`."""

import argparse
import inspect
import logging as std_logging
import re
import sys

from transformers.utils import logging

from .convert import DTYPES, convert
from .errors import ConversionError
from .weight_map import STRATEGIES, WIDENED_INITS


def _docstring_args(function) -> dict[str, str]:
    """The `Args:` entries of a Google-style docstring, so the API and the CLI share one text."""
    doc = inspect.getdoc(function)
    block = doc.split("Args:", 1)[1].split("Returns:", 1)[0]
    entries = re.split(r"\n(?=\s{4}\w+:)", block.strip("\n"))
    return {name.strip(): " ".join(text.split()) for name, text in (entry.split(":", 1) for entry in entries)}


def parser() -> argparse.ArgumentParser:
    helps = _docstring_args(convert)
    summary = inspect.getdoc(convert).split("Args:", 1)[0].strip()
    cli = argparse.ArgumentParser(
        prog="python -m conversion", description=summary, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Two optional positionals: with one path given, argparse fills SOURCE, and `main` moves it to OUTPUT.
    cli.add_argument("source", nargs="?", metavar="SOURCE", help=helps["source"])
    cli.add_argument("output", nargs="?", metavar="OUTPUT", help=helps["output"])
    cli.add_argument("--strategy", choices=STRATEGIES, default="v2", help=helps["strategy"])
    cli.add_argument("--preserve", action="store_true", help=helps["preserve"])
    cli.add_argument("--dtype", choices=list(DTYPES), help=helps["dtype"])
    cli.add_argument("--overwrite", action="store_true", help=helps["overwrite"])
    cli.add_argument(
        "--no-verify", dest="verify", action="store_false", help=helps["verify"].replace("Reload", "Skip: reload", 1)
    )
    cli.add_argument("--max-shard-size", default="5GB", help=helps["max_shard_size"])
    cli.add_argument("--seed", type=int, default=0, help=helps["seed"])
    cli.add_argument("--init", choices=WIDENED_INITS, default=None, help=helps["init"])
    cli.add_argument("--no-progress", dest="progress", action="store_false", help="Hide the progress bar.")
    cli.add_argument("--debug", action="store_true", help="Show full tracebacks and transformers' own log.")
    return cli


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    source, output = (None, args.source) if args.output is None else (args.source, args.output)

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
        progress=args.progress,
    )
    if args.init:
        options["init"] = args.init
    try:
        convert(**options)
    except ConversionError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except Exception as error:  # an unexpected failure: one line, the traceback on request
        if args.debug:
            raise
        print(f"error: {type(error).__name__}: {error} (run again with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        ours.removeHandler(handler)
        ours.setLevel(saved[0])
        ours.propagate = saved[1]
    return 0


if __name__ == "__main__":
    sys.exit(main())
