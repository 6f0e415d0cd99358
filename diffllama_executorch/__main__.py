"""Export a DiffLlama (or Llama) folder to an ExecuTorch program (XNNPACK, the KV cache inside).

    python -m diffllama_executorch out/SmolLM2-135M-Instruct-v2 out/SmolLM2-135M-Instruct-v2-executorch
"""

import argparse
import sys

from conversion.help import HelpFormatter, run_command

from .export import MAX_CACHE_LEN, export


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m diffllama_executorch", description=__doc__,
                                  formatter_class=HelpFormatter)
    cli.add_argument("source", metavar="SOURCE", help="a model folder, or a LoRA adapter folder on one (merged first)")
    cli.add_argument("output", metavar="OUTPUT", help="the folder to write (model.pte, tokenizer, layout)")
    cli.add_argument("--max-cache-len", type=int, default=MAX_CACHE_LEN,
                     help="tokens the program's cache holds: a prompt and its generation together")
    cli.add_argument("--overwrite", action="store_true", help="replace OUTPUT if an earlier export or conversion wrote it")
    args = cli.parse_args(argv)
    return run_command(lambda: export(args.source, args.output, max_cache_len=args.max_cache_len,
                                      overwrite=args.overwrite),
                       "wrote {}: run it with diffllama_executorch.ExecuTorchCausalLM")


if __name__ == "__main__":
    sys.exit(main())
