"""The `stop-fast` command line: a thin dispatcher over ``stop_fast/commands/<name>.py``.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int`` and imports nothing
heavy (torch, open_clip) at module level, so ``--help`` and argument errors answer at once. Errors a
user can cause come back as one line on stderr and exit status 2, never a traceback; ``--debug`` (or
``STOP_FAST_DEBUG=1``) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import warnings
from typing import List, Optional

from . import __version__
from .commands.errors import CLIError

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colour codes some libraries put in messages

# name -> (module under stop_fast.commands, one-line help); the order is the order of `--help`
COMMANDS = {
    "encode": ("encode", "embed a video file or a generated clip and print the embedding"),
    "prepare": ("prepare", "probe a dataset's videos into a manifest; optionally re-encode them"),
    "info": ("info", "show model sizes and trainable parameter counts for a configuration"),
    "demo": ("demo", "train STOP on generated videos it must tell from their time reversals, beside the ablations"),
    "train": ("train", "train STOP's prompts on a dataset (recognition or retrieval); torchrun for several GPUs"),
    "eval": ("eval", "evaluate trained prompts, or zero-shot CLIP, on a dataset split"),
    "predict": ("predict", "classify video files, or rank them for a caption, with trained prompts"),
    "visualize": ("visualize", "draw the patches, maps and prompt counts STOP computes for videos"),
    "index": ("index", "encode a video library once into an index folder for search (resumable, incremental)"),
    "search": ("search", "rank an index's videos for a caption (or a video) by exact cosine similarity"),
    "convert-weights": ("convert_weights", "convert a CLIP weights file once to safetensors (tensors only, no code)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stop-fast",
        description="STOP spatial-temporal dynamic prompting for frozen CLIP video models.",
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"stop-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"stop_fast.commands.{module_name}")
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # keep the examples' lines
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _user_error_message(exc: BaseException) -> Optional[str]:
    """The one-line message for an error the user can fix, or None for a bug (shown as a traceback)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        first = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        return f"out of memory on the GPU ({first}); lower --batch-size, --frames or --rho"
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)):
        return "out of memory; lower --batch-size, --frames or --rho"
    from .data.errors import VideoDecodeError

    if isinstance(exc, (CLIError, ValueError, VideoDecodeError, OSError, ImportError)):
        return " ".join(_ANSI.sub("", str(exc)).split()) or type(exc).__name__
    return None


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("STOP_FAST_DEBUG", "0") not in ("", "0")
    form = warnings.formatwarning
    if not debug:  # a warning is one line naming the command, like an error (--debug: Python's own form)
        warnings.formatwarning = lambda message, *rest, **kw: (
            f"stop-fast {args.command}: warning: {' '.join(_ANSI.sub('', str(message)).split())}\n")
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"stop-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        sys.stderr.close()
        return 0
    except Exception as exc:  # noqa: BLE001 - user errors become one line; bugs keep their traceback
        message = None if debug else _user_error_message(exc)
        if message is None:
            raise
        print(f"stop-fast {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = form


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
