"""The qdelta command line."""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from qdelta.atomic_io import user_path


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an int in ``low..high`` (no upper bound without ``high``),
    else a one-line usage error naming what was expected and what was found."""
    expected = f"an int >= {low}" if high is None else f"an int in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, found {value}")
        return value

    parse.__name__ = expected  # argparse names the type in some messages
    return parse


#: Every --seed: what torch and numpy generators take.
SEED = int_at_least(0, 2**63 - 1)


def _cmd_demo(args: argparse.Namespace) -> int:
    from qdelta.demo import run_demo

    result = run_demo(
        out_dir=args.out,
        tiny=args.tiny,
        cache_dir=args.cache,
        distill_steps=args.steps,
        seed=args.seed,
    )
    served = all(s["matches_merged_dense_model"] for s in result["mixed_batch"])
    rings = result["ring"]["ok"] and result["ring_sliding_window"]["ok"]
    return 0 if served and rings else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    from qdelta.zoo_eval import run_eval

    run_eval(
        out_dir=args.out,
        tiny=args.tiny,
        cache_dir=args.cache,
        distill_steps=args.steps,
        seed=args.seed,
    )
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from qdelta.store_cli import inspect

    return inspect(args.file)


def _cmd_verify(args: argparse.Namespace) -> int:
    from qdelta.store_cli import verify

    return verify(args.file)


def _flags_need(
    args: argparse.Namespace, command: str, flags: dict[str, str], needed: str, why: str
) -> int | None:
    """Exit code 2 (and a one-line message) when any of ``flags`` (attribute ->
    ``--name``, given = not None) comes without ``needed``: it would be ignored
    without a word. None when the combination is fine."""
    given = [flag for attr, flag in flags.items() if getattr(args, attr) is not None]
    if given and not getattr(args, needed.removeprefix("--").replace("-", "_")):
        print(
            f"qdelta {command}: {', '.join(given)} {why}; expected {needed} with them "
            "(or leave them out)",
            file=sys.stderr,
        )
        return 2
    return None


def _cmd_compress(args: argparse.Namespace) -> int:
    from qdelta.compress_cli import run_compress

    flags = {
        "steps": "--steps",
        "seed": "--seed",
        "seq_len": "--seq-len",
        "keep_trained": "--keep-trained",
    }
    why = "set the scale distillation, which runs with --calib only"
    if (code := _flags_need(args, "compress", flags, "--calib", why)) is not None:
        return code
    args.steps = 200 if args.steps is None else args.steps
    args.seed = 0 if args.seed is None else args.seed
    args.seq_len = 128 if args.seq_len is None else args.seq_len
    args.keep_trained = bool(args.keep_trained)
    return run_compress(args)


def _cmd_generate(args: argparse.Namespace) -> int:
    from qdelta.generate_cli import run_generate

    flags = {"temperature": "--temperature", "top_k": "--top-k", "seed": "--seed"}
    why = "set sampling, and decoding is greedy without --sample"
    if (code := _flags_need(args, "generate", flags, "--sample", why)) is not None:
        return code
    args.temperature = 1.0 if args.temperature is None else args.temperature
    return run_generate(args)


def _cmd_zoo(args: argparse.Namespace) -> int:
    from qdelta.zoo import main as zoo_main

    return zoo_main(
        (["--tiny"] if args.tiny else [])
        + ["--seed", str(args.seed)]
        + (["--cache", args.cache] if args.cache else [])
    )


def _cmd_ring_demo(args: argparse.Namespace) -> int:
    from qdelta.ring.demo import run_ring_demo

    if args.sliding_window is not None and (args.zoo or args.model):
        print(
            "qdelta ring-demo: --sliding-window builds the random Mistral model; expected no "
            f"--{'zoo' if args.zoo else 'model'} with it",
            file=sys.stderr,
        )
        return 2
    if args.zoo and (args.model or args.seq_len is not None):
        print(
            "qdelta ring-demo: --zoo runs the zoo's base on its held-out text as long as its "
            f"position table; expected no --{'model' if args.model else 'seq-len'} with it",
            file=sys.stderr,
        )
        return 2
    if args.zoo:
        from qdelta.demo import ring_check
        from qdelta.zoo import ZooConfig, build_zoo

        config = ZooConfig.tiny(args.seed) if args.zoo == "tiny" else ZooConfig.default(args.seed)
        zoo = build_zoo(config, args.cache)
        summary = ring_check(zoo, world_size=args.world_size, layout=args.layout)
        return 0 if summary["ok"] else 1
    summary = run_ring_demo(
        world_size=args.world_size,
        seq_len=1024 if args.seq_len is None else args.seq_len,
        layout=args.layout,
        seed=args.seed,
        model_dir=args.model,
        sliding_window=args.sliding_window,
    )
    return 0 if summary["ok"] else 1


def _cmd_analyze(args: argparse.Namespace) -> int:
    from qdelta.analysis import run_analyze

    return run_analyze(args)


def _cmd_autotune(args: argparse.Namespace) -> int:
    import warnings
    from pathlib import Path

    from qdelta.kernels import autotune
    from qdelta.store_cli import printable

    cache = autotune.DecisionCache(Path(args.file) if args.file else None)
    path = printable(cache._file_path())  # only printed from here on
    # Skipped malformed entries are reported as one line each, not a warning's source dump.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", autotune.AutotuneWarning)
        if args.clear:
            count = autotune.forget(cache)  # refuses anything that is not a decision file
        else:
            entries = autotune.recorded(cache, strict=True)
    for w in caught:
        print(f"qdelta autotune: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    if args.clear:
        print(f"removed {count} decisions from {path}")
        return 0
    print(f"{len(entries)} kernel decisions in {path}")
    for key, entry in sorted(entries.items()):
        times = {c: t for c, t in (entry.get("us") or {}).items() if t is not None}
        best = times.get(entry.get("choice"))
        timed = ", ".join(f"{c} {t:.1f}" for c, t in sorted(times.items(), key=lambda x: x[1]))
        shown = f"{best:.1f} us" if best is not None else "-"
        print(f"  {entry.get('choice')} ({shown}; timed: {timed or '-'} us)\n    {key}")
    return 0


def add_analyze_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``qdelta analyze`` arguments (also ``python -m qdelta.analysis``); here, not in
    qdelta.analysis, so that building the parser does not import torch."""
    from qdelta.bitplane import MAX_PLANES

    parser.add_argument("base", help="base model directory", type=user_path)
    parser.add_argument(
        "finetuned", nargs="+", type=user_path, help="fine-tuned model dirs or .qdelta files"
    )
    parser.add_argument("--json", default=None, type=user_path, help="write the statistics as JSON")
    parser.add_argument(
        "--plot", default=None, type=user_path, help="write a PNG of dM vs dD per layer"
    )
    parser.add_argument(
        "--planes",
        type=int_at_least(1, MAX_PLANES),
        default=3,
        help=f"max planes for errors (1..{MAX_PLANES}, default 3)",
    )
    parser.add_argument(
        "--steps",
        action="store_true",
        help="the fine-tunes are checkpoints of one run, in order: plot each layer's "
        "trajectory through them (default: independent fine-tunes, one series each)",
    )
    return parser


#: The zoo's cache directory, as qdelta.zoo.default_cache_dir() resolves it.
ZOO_CACHE_HELP = "zoo cache directory (default $QDELTA_CACHE/zoo, else ~/.cache/qdelta/zoo)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdelta", description=__doc__)
    from qdelta import __version__

    parser.add_argument("--version", action="version", version=f"qdelta {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the end-to-end demonstration")
    demo.add_argument(
        "--out", default="results", type=user_path, help="directory for results (default: results)"
    )
    demo.add_argument("--seed", type=SEED, default=0)
    demo.add_argument("--tiny", action="store_true", help="the CI-sized zoo (seconds)")
    demo.add_argument("--cache", default=None, type=user_path, help=ZOO_CACHE_HELP)
    demo.add_argument(
        "--steps",
        type=int_at_least(0),
        default=None,
        help="distillation steps (default 200; 20 with --tiny)",
    )
    demo.set_defaults(func=_cmd_demo)
    ev = sub.add_parser(
        "eval", help="held-out perplexity of every zoo tenant: base, fine-tune, 1/2/3-bit deltas"
    )
    ev.add_argument(
        "--out", default="results", type=user_path, help="directory for quality.json and deltas/"
    )
    ev.add_argument("--seed", type=SEED, default=0)
    ev.add_argument("--tiny", action="store_true", help="the CI-sized zoo (seconds)")
    ev.add_argument("--cache", default=None, type=user_path, help=ZOO_CACHE_HELP)
    ev.add_argument(
        "--steps",
        type=int_at_least(0),
        default=None,
        help="distillation steps (default 200; 20 with --tiny)",
    )
    ev.set_defaults(func=_cmd_eval)
    inspect = sub.add_parser(
        "inspect", help="show the layers, sizes and fingerprint of a .qdelta file"
    )
    inspect.add_argument("file", type=user_path)
    inspect.set_defaults(func=_cmd_inspect)
    verify = sub.add_parser("verify", help="check every checksum of a .qdelta file (exit 0 or 1)")
    verify.add_argument("file", type=user_path)
    verify.set_defaults(func=_cmd_verify)
    comp = sub.add_parser("compress", help="compress a fine-tune into a .qdelta file")
    comp.add_argument(
        "base", type=user_path, help="base model directory (Hugging Face, safetensors)"
    )
    comp.add_argument("finetuned", type=user_path, help="fine-tuned model directory")
    comp.add_argument(
        "-o", "--output", type=user_path, required=True, help="the .qdelta file to write"
    )
    from qdelta.bitplane import MAX_PLANES

    comp.add_argument(
        "--bits",
        type=int_at_least(1, MAX_PLANES),
        default=1,
        help="sign planes per layer (default 1)",
    )
    comp.add_argument("--scale", choices=["matrix", "row"], default="matrix")
    comp.add_argument(
        "--calib", type=user_path, help="text file for scale distillation (skipped without)"
    )
    comp.add_argument(
        "--steps",
        type=int_at_least(0),
        default=None,
        help="distillation steps (default 200; with --calib)",
    )
    comp.add_argument(
        "--seed", type=SEED, default=None, help="distillation batch order (default 0; with --calib)"
    )
    comp.add_argument(
        "--seq-len",
        type=int_at_least(1),
        default=None,
        help="calibration window in tokens (default 128, at most the model's positions; "
        "with --calib)",
    )
    comp.add_argument(
        "--keep-trained",
        action="store_true",
        default=None,
        help="keep the trained scales even when they fit worse than the initial ones "
        "(default: keep the better; with --calib)",
    )
    comp.add_argument(
        "--target",
        action="append",
        metavar="PATTERN",
        help="compress only these layers: an exact name, a suffix or a regex (repeatable; "
        "default: every linear layer inside the blocks)",
    )
    comp.add_argument(
        "--exclude", action="append", metavar="PATTERN", help="layers to keep whole (repeatable)"
    )
    comp.add_argument(
        "--embeddings",
        action="store_true",
        help="compress embeddings and the head too (tied ones are stored once)",
    )
    comp.add_argument("--tenant", default="", help="the tenant name written into the file")
    comp.set_defaults(func=_cmd_compress)
    gen = sub.add_parser(
        "generate",
        help="one batch, each row served by its own tenant of a delta store",
        description="Decode one left-padded batch on BASE_DIR with every row served by "
        "its tenant from STORE_DIR (a directory of TENANT.qdelta files), in one forward "
        "per step. The tokenizer is BASE_DIR's (qdelta_tokenizer.json or a Hugging Face "
        "tokenizer, local files only).",
    )
    gen.add_argument(
        "base", type=user_path, help="base model directory (Hugging Face, safetensors)"
    )
    gen.add_argument("store", type=user_path, help="delta store directory (TENANT.qdelta files)")
    gen.add_argument(
        "--tenant",
        action="append",
        required=True,
        metavar="NAME",
        help="a row's tenant, '-' for the base model (repeatable: one row each)",
    )
    gen.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        help="one prompt for every row, or one per --tenant in order",
    )
    gen.add_argument("--max-new-tokens", type=int_at_least(1), default=32)
    gen.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    gen.add_argument("--temperature", type=float, default=None, help="with --sample (default 1.0)")
    gen.add_argument("--top-k", type=int_at_least(1), default=None, help="with --sample")
    gen.add_argument("--seed", type=SEED, default=None, help="sampling seed (with --sample)")
    gen.add_argument("--json", action="store_true", help="print the rows as JSON")
    gen.set_defaults(func=_cmd_generate)
    zoo = sub.add_parser("zoo", help="build (or find cached) the offline model zoo")
    zoo.add_argument("--tiny", action="store_true", help="the CI-sized configuration")
    zoo.add_argument("--seed", type=SEED, default=0)
    zoo.add_argument("--cache", default=None, type=user_path, help=ZOO_CACHE_HELP)
    zoo.set_defaults(func=_cmd_zoo)
    ring = sub.add_parser(
        "ring-demo", help="run a Llama model over a ring of CPU processes and check its logits"
    )
    ring.add_argument("--world-size", type=int_at_least(1), default=2, help="ranks (default 2)")
    ring.add_argument(
        "--seq-len",
        type=int_at_least(1),
        default=None,
        help="random input tokens (default 1024; at least one per chunk of the layout)",
    )
    ring.add_argument("--layout", choices=["contiguous", "zigzag"], default="zigzag")
    ring.add_argument("--seed", type=SEED, default=0)
    ring.add_argument(
        "--model",
        default=None,
        type=user_path,
        help="local Llama checkpoint dir (default: tiny random)",
    )
    ring.add_argument(
        "--zoo",
        nargs="?",
        const="default",
        choices=["default", "tiny"],
        default=None,
        help="use the model zoo's base on its held-out code text (built or cached)",
    )
    ring.add_argument("--cache", default=None, type=user_path, help=ZOO_CACHE_HELP + "; with --zoo")
    ring.add_argument(
        "--sliding-window",
        type=int_at_least(1),
        default=None,
        help="the random model is a Mistral with this sliding window (tokens)",
    )
    ring.set_defaults(func=_cmd_ring_demo)
    tune = sub.add_parser(
        "autotune", help="show (or --clear) the GPU kernel choices autotuning has measured"
    )
    tune.add_argument("--clear", action="store_true", help="delete the decisions")
    tune.add_argument(
        "--file",
        default=None,
        type=user_path,
        help="decision file (default $QDELTA_AUTOTUNE_CACHE or ~/.cache)",
    )
    tune.set_defaults(func=_cmd_autotune)
    analyze = sub.add_parser(
        "analyze", help="per-layer delta statistics of fine-tunes (norms, signs, DoRA view)"
    )
    add_analyze_arguments(analyze).set_defaults(func=_cmd_analyze)
    return parser


class _Terminated(BaseException):
    """SIGTERM as an exception: the cleanup that Ctrl-C runs (temporaries, build
    folders) runs for ``kill`` too."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def _settle_stdout() -> None:
    """Flush stdout now; where that fails (a full disk, a closed pipe) send it to
    /dev/null so Python's own flush at exit adds no second error."""
    try:
        sys.stdout.flush()
    except OSError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qdelta.errors import QDeltaError
    from qdelta.optional import EXTRAS, missing

    previous = None
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a full disk under stdout is an error here, not at exit
        return code
    except ModuleNotFoundError as e:  # an optional package a command reached
        if (e.name or "").split(".")[0] not in EXTRAS:
            raise
        return _error(args.command, missing(e.name, f"qdelta {args.command}"))
    except QDeltaError as e:
        return _error(args.command, e)
    except (KeyboardInterrupt, _Terminated) as e:
        # Writes are atomic: a file being written is either complete or untouched.
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated"
        print(
            f"qdelta {args.command}: {what} (any file being written is either complete "
            "or left as it was)",
            file=sys.stderr,
        )
        if isinstance(e, _Terminated):
            # Cleanup done: now die of the signal, as the sender expects (a caller's
            # loop must not go on, and a supervisor sees "killed by SIGTERM").
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        return 130
    except BrokenPipeError:
        # `qdelta inspect F | head`: the reader left; no traceback, no second error
        # when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # e.g. stdout on a full disk, a file that cannot be read
        if isinstance(e, io.UnsupportedOperation):  # a programming error, not the system's
            raise
        _settle_stdout()
        return _error(args.command, e)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _error(command: str, e: Exception) -> int:
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"qdelta {command}: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
