"""Export a DiffLlama (or Llama) folder to ONNX Runtime, and check the graph against the model.

    python -m diffllama_onnx out/SmolLM2-135M-Instruct-v2 out/SmolLM2-135M-Instruct-v2-onnx [--int8]
"""

import argparse
import sys

from conversion.help import HelpFormatter, run_command

from .export import OPSET, export


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m diffllama_onnx", description=__doc__, formatter_class=HelpFormatter)
    cli.add_argument("source", metavar="SOURCE", help="a model folder, or a LoRA adapter folder on one (merged first)")
    cli.add_argument("output", metavar="OUTPUT", help="the folder to write (model.onnx, tokenizer, layout)")
    cli.add_argument("--int8", action="store_true", help="also write model.int8.onnx, onnxruntime's dynamic int8")
    cli.add_argument("--opset", type=int, default=OPSET, help="ONNX opset")
    cli.add_argument("--overwrite", action="store_true", help="replace OUTPUT if an earlier export or conversion wrote it")
    args = cli.parse_args(argv)
    return run_command(lambda: export(args.source, args.output, int8=args.int8, overwrite=args.overwrite,
                                      opset=args.opset),
                       "wrote {}: run it with diffllama_onnx.OnnxCausalLM")


if __name__ == "__main__":
    sys.exit(main())
