"""Tokenizer speed against the reference libraries, in one process, on the test corpus (tests/support/corpus.py:
~2,700 strings, ~960k characters, one past 400k).

For each tokenizer this prints the time to encode the whole corpus and to decode all its id lists, ours and the
reference's, and ours/reference (aim <= 1.2):

  SmolLM2 tokenizer.json   `tokenizers`: Tokenizer.encode(s).ids, Tokenizer.decode(ids, skip_special_tokens=False)
  Llama 3 / Llama 4        `tiktoken` as Meta's code calls it (encode with allowed_special=set(),
                           disallowed_special=(), BOS first; decode), and Meta's reference Tokenizer itself, which
                           adds the 25k-run split in Python (files from the llama-models wheel, fetched by the
                           tests into $LLAMA_LENS_HOME; skipped when absent)
  sentencepiece            `sentencepiece` encode / decode, on a model trained with Llama 2's settings

Candidates run in turns (ours, reference, ours, ...) and the medians over the turns are reported, so that other
load on a shared machine falls on both alike.

Usage: python scripts/bench_tokenizer.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.corpus import corpus  # noqa: E402
from support.meta_reference import META_FILES, import_meta_tokenizer, train_llama2_style  # noqa: E402

import llama_lens as ll  # noqa: E402
from llama_lens.loading.demo import cache_dir  # noqa: E402
from llama_lens.tokenizer import SentencePieceTokenizer, load_tokenizer  # noqa: E402


def interleaved(candidates: dict, repeats: int) -> dict[str, list[float]]:
    """Each candidate's time per turn; within a turn the candidates run one after the other."""
    for fn in candidates.values():
        fn()  # warm-up: caches, lazy init
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def report(label: str, candidates: dict, repeats: int) -> None:
    """Median times, and the median of each turn's own ratio: a turn's candidates share the machine's state
    (clock speed, other load), so the per-turn ratio drifts less than a ratio of two medians."""
    times = interleaved(candidates, repeats)
    ours = times.pop("ours")
    for name, seconds in times.items():
        ratio = statistics.median(a / b for a, b in zip(ours, seconds))
        print(
            f"{label:<22} ours {statistics.median(ours) * 1e3:8.1f} ms   {name:<22} "
            f"{statistics.median(seconds) * 1e3:8.1f} ms   ours/ref {ratio:5.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    texts = corpus()
    print(
        f"corpus: {len(texts)} strings, {sum(map(len, texts)):,} characters; medians of {args.repeats} turns "
        "(ratios: the median of each turn's own)\n"
    )

    # SmolLM2's tokenizer.json against tokenizers
    from tokenizers import Tokenizer as Backend

    path = ll.demo_model_path()
    ours, backend = load_tokenizer(path), Backend.from_file(str(path / "tokenizer.json"))
    id_lists = [ours.encode(s) for s in texts]
    report(
        "SmolLM2 encode",
        {"ours": lambda: [ours.encode(s) for s in texts], "tokenizers": lambda: [backend.encode(s).ids for s in texts]},
        args.repeats,
    )
    report(
        "SmolLM2 decode",
        {
            "ours": lambda: [ours.decode(ids) for ids in id_lists],
            "tokenizers": lambda: [backend.decode(ids, skip_special_tokens=False) for ids in id_lists],
        },
        args.repeats,
    )

    # Meta's tiktoken files against tiktoken (as Meta calls it) and Meta's own code
    folder = cache_dir() / "llama_models-0.3.0"
    if all((folder / name).is_file() for name in META_FILES):
        for version in ("llama3", "llama4"):
            model_path = folder / "llama_models" / version / "tokenizer.model"
            ours = load_tokenizer(model_path)
            meta = import_meta_tokenizer(folder, version).Tokenizer(model_path)
            encoding, bos = meta.model, meta.bos_id
            id_lists = [ours.encode(s) for s in texts]
            report(
                f"{version} encode",
                {
                    "ours": lambda: [ours.encode(s) for s in texts],
                    "tiktoken": lambda: [[bos, *encoding.encode(s, disallowed_special=())] for s in texts],
                    "meta Tokenizer.encode": lambda: [meta.encode(s, bos=True, eos=False) for s in texts],
                },
                args.repeats,
            )
            report(
                f"{version} decode",
                {
                    "ours": lambda: [ours.decode(ids) for ids in id_lists],
                    "tiktoken": lambda: [encoding.decode(ids) for ids in id_lists],
                },
                args.repeats,
            )
    else:
        print(f"(Llama 3/4 skipped: no {folder}; run tests/tokenizer/test_tokenizer_reference.py once to fetch it)")

    # sentencepiece, a model trained with Llama 2's settings
    import sentencepiece

    proto = train_llama2_style([s for s in texts[:700] if 0 < len(s) < 2_000] * 3)
    ours, sp = SentencePieceTokenizer(model_proto=proto), sentencepiece.SentencePieceProcessor(model_proto=proto)
    id_lists = [ours.encode(s) for s in texts]
    report(
        "sentencepiece encode",
        {"ours": lambda: [ours.encode(s) for s in texts], "sentencepiece": lambda: [[1, *sp.encode(s)] for s in texts]},
        args.repeats,
    )
    report(
        "sentencepiece decode",
        {
            "ours": lambda: [ours.decode(ids) for ids in id_lists],
            "sentencepiece": lambda: [sp.decode(ids) for ids in id_lists],
        },
        args.repeats,
    )


if __name__ == "__main__":
    main()
