"""Command-line conventions shared by lvm's entry points (kept free of heavy imports).

Every `python -m lvm.<tool>` is a Hydra app whose first argument may be given bare, that prints one
line on stderr for bad input (never a traceback) and exits 0 (done / pass), 1 (fail: a verdict, or
a training run that failed) or 2 (no result: bad input, configuration or checkpoint; Hydra's own
override errors too). Training adds 3 (stopped by the guard after max_rollbacks), 4 (preempted
by SIGTERM/SIGUSR1 after saving a resumable last.ckpt) and 130 (interrupted by Ctrl-C, after the
same save: the shell's code for SIGINT).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig

from lvm.runtime.errors import LvmError

# Hydra's config_path for every tool, absolute: a console script's module is not __main__, and
# Hydra reads a relative config_path from such a module as a Python package (conf/ is not one).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_PREEMPTED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process Ctrl-C ended
_outcome = {"code": EXIT_OK}  # set by the task function: hydra.main does not return its result


def set_exit_code(code: int) -> None:
    """The exit code `run_entry_point` ends with (for a task that returns something else)."""
    _outcome["code"] = code


def exit_code_for(status: str) -> int:
    """Exit code of a training run's status (results.json)."""
    if status == "completed":
        return EXIT_OK
    if status.startswith("stopped"):
        return EXIT_STOPPED
    if status == "preempted":
        return EXIT_PREEMPTED
    if status == "interrupted":
        return EXIT_INTERRUPTED
    return EXIT_FAIL


def positional_override(argv: list[str], key: str) -> list[str]:
    """`prog VALUE k=v ...` as `prog key='VALUE' k=v ...`: the first argument may be given bare
    (a path without '='); quoted so that spaces and Hydra's special characters survive."""
    if len(argv) > 1 and "=" not in argv[1] and not argv[1].startswith("-"):
        quoted = argv[1].replace("'", "\\'")  # Hydra's quoted strings escape only quotes
        return [argv[0], f"{key}='{quoted}'", *argv[2:]]
    return argv


def entry_point(prog: str) -> Callable[[Callable[[DictConfig], int | None]], Callable[[DictConfig], None]]:
    """Wrap a Hydra task function (apply under @hydra.main): what it returns is the exit code
    (None: 0); an LvmError becomes `prog: message` on stderr and exit code 2."""

    def wrap(task: Callable[[DictConfig], int | None]) -> Callable[[DictConfig], None]:
        @functools.wraps(task)
        def guarded(cfg: DictConfig) -> None:
            try:
                set_exit_code(task(cfg) or EXIT_OK)
            except LvmError as e:
                print(f"{prog}: {e}", file=sys.stderr)
                set_exit_code(EXIT_BAD_INPUT)

        return guarded

    return wrap


def program_name() -> str:
    """How the user started this process: `lvm.bench` for `python -m lvm.bench`, else the script's name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name.removesuffix(".__main__") if spec is not None else Path(sys.argv[0]).name


def run_entry_point(main: Callable[[], Any], positional: str | None = None) -> NoReturn:
    """Run a Hydra main (the first argument bare for `positional`) and exit with its outcome."""
    if positional:
        sys.argv = positional_override(sys.argv, positional)
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside a training's own handling (set-up, a tool's work)
        print(f"{program_name()}: interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except SystemExit as e:  # Hydra's own errors (unknown key, bad override) exit 1: no result
        if isinstance(e.code, str):  # SystemExit("message"), as raised by a Hydra callback
            print(e.code, file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT if e.code not in (None, 0) else EXIT_OK) from None
    raise SystemExit(_outcome["code"])
