"""``cbm concepts generate | filter | select | show``: concept banks from the command line.

``add_commands(subparsers, load_encoder=..., load_embeddings=..., printable=...)`` adds the ``concepts``
command to an argparse subparsers object. This package never imports ``cbm``; the caller passes:

- ``load_encoder(spec: str) -> encoder`` with ``encode_texts(list[str]) -> Tensor[K,D]`` and
  (ideally) ``fingerprint``;
- ``load_embeddings(backbone_spec: str, data_spec: str) -> (features [N,D], labels [N],
  class_names list[str])``;
- ``printable(text) -> str``: how a name from a file or an LLM is printed (``cbm`` passes
  ``cbm.untrusted.for_terminal``, which shows control characters as escapes).

Commands that write ``--out`` refuse an existing output unless ``--force`` is given.

Each command sets ``run`` (``args.run(args) -> int``); errors are ``ValueError``,
``FileNotFoundError`` or ``RuntimeError`` with a one-sentence message.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from concepts import filters
from concepts.bank import BANK_JSON, DEFAULT_TEMPLATES, VECTORS_FILE, ConceptBank
from concepts.generate import (
    CONCEPTNET_RELATIONS,
    PROMPT_SETS,
    REFERENCE_WEIGHT_ABOVE,
    STARTERS,
    Candidates,
    ChatClient,
    from_awa,
    from_conceptnet,
    from_csv,
    from_cub,
    from_list,
    from_llm,
    from_starter,
)
from concepts.select import select_concepts

EncoderLoader = Callable[[str], Any]
EmbeddingsLoader = Callable[[str, str], tuple[Any, Any, list[str]]]
Printable = Callable[[Any], str]

EPILOG = """workflow:
  cbm concepts generate llm --classes @classes.txt --base-url http://localhost:11434/v1 --model llama3 --out cand.json
  cbm concepts filter cand.json --clean --max-chars 30 --class-names exact --encoder toy:clip --dedupe 0.9 \\
      --absent 0.25 --data toy:images@train --out filtered.json
  cbm concepts select filtered.json --encoder toy:clip --data toy:images@train --k 10 --out bank/
  cbm concepts show bank/

candidate files are JSON ({"format", "classes": {class: [concepts]}, "provenance"}); banks are folders
(bank.json + vectors.safetensors)."""


def _weight_above(items: list[str] | None) -> float | dict[str, float] | None:
    """``--weight-above``: absent (Post-hoc CBM's filter), ``none``, one number, or ``REL=W`` items."""
    if items is None:
        return REFERENCE_WEIGHT_ABOVE
    if len(items) == 1 and "=" not in items[0]:
        return None if items[0].lower() == "none" else _number(items[0])
    pairs = [item.split("=", 1) for item in items]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"--weight-above takes one number, 'none', or REL=W items, got {' '.join(items)}.")
    return {relation: _number(value) for relation, value in pairs}


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--weight-above expects a number, got {text!r}.") from None


def _classes(value: str) -> list[str]:
    """``a,b,c`` or ``@file`` (one class per line)."""
    if value.startswith("@"):
        names = [line.strip() for line in Path(value[1:]).read_text(encoding="utf-8").splitlines()]
    else:
        names = [part.strip() for part in value.split(",")]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"no class names in {value!r}.")
    return names


def _summary(candidates: Candidates) -> str:
    return f"{len(candidates)} distinct concepts over {len(candidates.per_class)} classes"


def _refuse_existing(args: argparse.Namespace, *paths: Path) -> None:
    """FileExistsError before any work when an output exists and ``--force`` was not given."""
    for path in paths:
        if path.exists() and not args.force:
            raise FileExistsError(f"{path} exists and is never replaced silently; choose another --out or pass "
                                  "--force to replace it.")


def _generate(args: argparse.Namespace) -> int:
    _refuse_existing(args, Path(args.out))
    source = args.source
    if source == "llm":
        client = ChatClient(args.base_url, args.model, api_key_env=args.api_key_env or None,
                            temperature=args.temperature, cache_dir=args.cache_dir, timeout=args.timeout,
                            retries=args.retries, requests_per_minute=args.rpm)
        result = from_llm(_classes(args.classes), client, prompts=args.prompts, on_error=args.on_error)
    elif source == "conceptnet":
        result = from_conceptnet(_classes(args.classes), relations=args.relations,
                                 weight_above=_weight_above(args.weight_above),
                                 base_url=args.base_url, cache_dir=args.cache_dir, on_error=args.on_error)
    elif source == "cub":
        result = from_cub(args.root, threshold=args.threshold)
    elif source == "awa":
        result = from_awa(args.root, binary=not args.continuous, threshold=args.threshold)
    elif source == "csv":
        result = from_csv(args.file, threshold=args.threshold)
    elif source == "list":
        result = from_list(args.file)
    else:
        result = from_starter(args.name)
    result.save(args.out)
    skipped = result.provenance.get("skipped") or []
    print(f"wrote {args.out}: {_summary(result)}" + (f"; {len(skipped)} requests skipped (see provenance)"
                                                        if skipped else ""))
    return 0


def _filter(args: argparse.Namespace, load_encoder: EncoderLoader, load_embeddings: EmbeddingsLoader) -> int:
    _refuse_existing(args, Path(args.out))
    candidates = Candidates.load(args.input)
    needs_encoder = args.class_similarity is not None or args.dedupe is not None or args.absent is not None
    if needs_encoder and not args.encoder:
        raise ValueError("--class-similarity, --dedupe and --absent need --encoder (a vision-language backbone).")
    encoder = load_encoder(args.encoder) if needs_encoder else None
    if args.clean:
        candidates = filters.clean(candidates)
    if args.max_chars is not None or args.max_words is not None:
        candidates = filters.remove_too_long(candidates, args.max_chars, args.max_words)
    if args.class_names or args.class_similarity is not None:
        similarity = {} if args.class_similarity is None else {"encoder": encoder, "threshold": args.class_similarity}
        candidates = filters.remove_class_names(candidates, match=args.class_names or "exact", **similarity)
    if args.dedupe is not None:
        candidates = filters.remove_near_duplicates(candidates, encoder, args.dedupe)
    if args.absent is not None:
        if not args.data:
            raise ValueError("--absent needs --data (the training images to look for the concepts in).")
        features, _, _ = load_embeddings(args.encoder, args.data)
        candidates = filters.remove_absent(candidates, encoder, features, top_k=args.top_k, cutoff=args.absent,
                                           backbone=getattr(encoder, "fingerprint", None))
    candidates.save(args.out)
    for step in candidates.provenance.get("filters", []):
        print(f"{step['filter']}: removed {len(step['removed'])}, replaced {len(step['replaced'])}")
    print(f"wrote {args.out}: {_summary(candidates)}")
    return 0


def _select(args: argparse.Namespace, load_encoder: EncoderLoader, load_embeddings: EmbeddingsLoader) -> int:
    _refuse_existing(args, Path(args.out) / BANK_JSON, Path(args.out) / VECTORS_FILE)
    candidates = Candidates.load(args.input)
    encoder = load_encoder(args.encoder)
    features, labels, class_names = load_embeddings(args.encoder, args.data)
    bank = select_concepts(candidates, encoder, features, labels, class_names, k=args.k, method=args.method,
                           beta=args.beta, seed=args.seed, templates=args.templates,
                           backbone=getattr(encoder, "fingerprint", None))
    bank.save(args.out)
    print(f"wrote {args.out}: {len(bank)} concepts for {len(bank.provenance['class_concepts'])} classes")
    return 0


def _show(args: argparse.Namespace, printable: Printable) -> int:
    path = Path(args.path)
    if (path / BANK_JSON).is_file():
        bank = ConceptBank.load(path)
        print(printable(repr(bank)))
        for i, name in enumerate(bank.names[:args.limit]):
            extra = "  ".join(f"{k}={v[i]:.3g}" for k, v in bank.stats.items() if k in ("C", "val_accuracy"))
            print(f"  {printable(name)}" + (f"  {extra}" if extra else ""))
        if len(bank) > args.limit:
            print(f"  ... and {len(bank) - args.limit} more")
        provenance = bank.provenance
    else:
        candidates = Candidates.load(path)
        print(_summary(candidates))
        for name, phrases in list(candidates.per_class.items())[:args.limit]:
            print(f"  {printable(name)}: {', '.join(map(printable, phrases[:8]))}"
                  + (" ..." if len(phrases) > 8 else ""))
        provenance = candidates.provenance
    if args.provenance:
        print("\n".join(map(printable, json.dumps(provenance, indent=1, ensure_ascii=False).split("\n"))))
    return 0


def add_commands(subparsers: argparse._SubParsersAction, *, load_encoder: EncoderLoader,
                 load_embeddings: EmbeddingsLoader, printable: Printable = str) -> argparse.ArgumentParser:
    """Add ``concepts`` with its ``generate``, ``filter``, ``select`` and ``show`` subcommands."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = subparsers.add_parser("concepts", help="generate, filter, select and inspect concept banks",
                                   description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=raw)
    commands = parser.add_subparsers(dest="concepts_command", metavar="STEP", required=True)

    gen = commands.add_parser("generate", help="concept candidates per class from a source",
                              description="Write concept candidates per class (JSON) from an LLM, ConceptNet, "
                                          "attribute files, a list or a shipped starter bank.")
    sources = gen.add_subparsers(dest="source", metavar="SOURCE", required=True)

    def source(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = sources.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--out", required=True, help="candidates JSON file to write")
        sub.add_argument("--force", action="store_true", help="replace --out if it exists")
        sub.set_defaults(run=_generate)
        return sub

    llm = source("llm", "ask an OpenAI-compatible chat endpoint (OpenAI, Ollama, vLLM, llama.cpp)")
    llm.add_argument("--classes", required=True, help="class names: a,b,c or @FILE (one per line)")
    llm.add_argument("--base-url", required=True, help="API root, e.g. http://localhost:11434/v1")
    llm.add_argument("--model", required=True, help="model name the server knows")
    llm.add_argument("--api-key-env", default="OPENAI_API_KEY",
                     help="environment variable holding the key (default OPENAI_API_KEY; '' for none)")
    llm.add_argument("--prompts", choices=sorted(PROMPT_SETS), default="lfcbm",
                     help="lfcbm: features, superclasses, things around; labo: appearance, colour, pattern, shape")
    llm.add_argument("--temperature", type=float, default=0.0)
    llm.add_argument("--cache-dir", help="response cache folder (reruns are then free and reproducible)")
    llm.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    llm.add_argument("--retries", type=int, default=3, help="retries on timeouts, 429 and 5xx (default 3)")
    llm.add_argument("--rpm", type=float, help="at most this many requests per minute")
    llm.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                     help="stop at the first failed request (default) or skip it and record why")

    net = source("conceptnet", "neighbours of each class in the ConceptNet web API (needs network)")
    net.add_argument("--classes", required=True, help="class names: a,b,c or @FILE")
    net.add_argument("--relations", nargs="+", choices=CONCEPTNET_RELATIONS, default=list(CONCEPTNET_RELATIONS))
    net.add_argument("--weight-above", nargs="+", metavar="[REL=]W",
                     help="keep edges weighing more than W: one number for every relation, REL=W per relation "
                          "(others keep every edge), or 'none'; default: Post-hoc CBM's filter, IsA=1")
    net.add_argument("--base-url", default="https://api.conceptnet.io")
    net.add_argument("--cache-dir", help="response cache folder")
    net.add_argument("--on-error", choices=["raise", "skip"], default="raise")

    cub = source("cub", "CUB-200-2011 class-attribute percentages")
    cub.add_argument("root", help="folder holding CUB_200_2011/ (and attributes.txt)")
    cub.add_argument("--threshold", type=float, default=50.0, help="percentage of images (default 50)")
    awa = source("awa", "Animals-with-Attributes predicate matrix")
    awa.add_argument("root", help="folder with classes.txt, predicates.txt, predicate-matrix-*.txt")
    awa.add_argument("--continuous", action="store_true", help="threshold the continuous matrix")
    awa.add_argument("--threshold", type=float, help="default 0.5 (binary) or 50 (continuous)")
    table = source("csv", "a class x attribute CSV (header: class,attr1,attr2,...)")
    table.add_argument("file")
    table.add_argument("--threshold", type=float, default=0.5)
    listing = source("list", "a .txt (one per line), .json or .yaml list, global or class -> list")
    listing.add_argument("file")
    starter = source("starter", "a starter bank shipped with the toolkit")
    starter.add_argument("name", choices=STARTERS)

    filt = commands.add_parser("filter", help="filter candidates (Label-free CBM steps), recording each removal",
                               description="Apply the chosen filters in this order: clean, length, class names, "
                                           "near-duplicates, absent from the data. Each is recorded in provenance.")
    filt.add_argument("input", help="candidates JSON file")
    filt.add_argument("--out", required=True, help="filtered candidates JSON file to write")
    filt.add_argument("--force", action="store_true", help="replace --out if it exists")
    filt.add_argument("--clean", action="store_true", help="lowercase, strip leading articles, merge plurals")
    filt.add_argument("--max-chars", type=int, help="drop phrases longer than this (Label-free CBM: 30)")
    filt.add_argument("--max-words", type=int, help="drop phrases with more words than this")
    filt.add_argument("--class-names", choices=["exact", "contains"], help="drop phrases naming a class")
    filt.add_argument("--class-similarity", type=float,
                      help="also drop phrases whose text cosine with a class name is at least this (e.g. 0.85)")
    filt.add_argument("--dedupe", type=float, help="merge phrases with text cosine at least this (e.g. 0.9)")
    filt.add_argument("--absent", type=float, help="drop phrases whose mean top-k image cosine is below this")
    filt.add_argument("--top-k", type=int, default=5, help="k for --absent (default 5)")
    filt.add_argument("--encoder", help="vision-language backbone spec for the similarity filters")
    filt.add_argument("--data", help="training dataset spec for --absent")
    filt.set_defaults(run=lambda args: _filter(args, load_encoder, load_embeddings))

    sel = commands.add_parser("select", help="choose k concepts per class and write a text concept bank",
                              description="LaBo-style selection on training embeddings: per class, greedy "
                                          "submodular (discriminability + coverage), top-k or random.")
    sel.add_argument("input", help="candidates JSON file")
    sel.add_argument("--encoder", required=True, help="vision-language backbone spec")
    sel.add_argument("--data", required=True, help="training dataset spec (its class names must match)")
    sel.add_argument("--out", required=True, help="bank folder to write")
    sel.add_argument("--force", action="store_true", help="replace the bank in --out if there is one")
    sel.add_argument("--k", type=int, default=10, help="concepts per class (default 10)")
    sel.add_argument("--method", choices=["submodular", "top", "random"], default="submodular")
    sel.add_argument("--beta", type=float, default=1.0, help="weight of coverage vs discriminability (default 1)")
    sel.add_argument("--seed", type=int, default=0)
    sel.add_argument("--templates", nargs="+", default=list(DEFAULT_TEMPLATES), metavar="TEMPLATE",
                     help="prompt templates with {} that each concept is encoded with, averaged "
                          f"(default: {' | '.join(DEFAULT_TEMPLATES)})")
    sel.set_defaults(run=lambda args: _select(args, load_encoder, load_embeddings))

    show = commands.add_parser("show", help="summarise a bank folder or a candidates file",
                               description="Print a bank's or candidate file's contents and, on request, provenance.")
    show.add_argument("path")
    show.add_argument("--limit", type=int, default=20, help="concepts or classes to list (default 20)")
    show.add_argument("--provenance", action="store_true", help="print the full provenance as JSON")
    show.set_defaults(run=lambda args: _show(args, printable))
    return parser
