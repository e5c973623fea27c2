"""What the command-line tools (train.py, luna_jax.experiments.sweep, .results, .conversion)
share: a user error (bad input, a damaged or busy run folder) ends the process with one line,
`PROG: error: Type: message`, and exit status 1 (or the one given); set LUNA_JAX_TRACEBACK=1
(train.py: or pass --verbosity) to print its traceback first. Light: imports no jax."""
from __future__ import annotations

import os
import sys
import traceback
from typing import NoReturn

TRACEBACK_ENV = "LUNA_JAX_TRACEBACK"


def wants_traceback() -> bool:
  return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def one_line(error: BaseException) -> str:
  """`Type: message` with the message's lines joined."""
  text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
  return f"{type(error).__name__}: {text or repr(error)}"


def fail(prog: str, error: BaseException, code: int = 1, traceback_too: bool = False
         ) -> NoReturn:
  """Exits with `PROG: error: Type: message` on stderr (the traceback first if asked)."""
  if traceback_too or wants_traceback():
    traceback.print_exception(error)
  print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
  sys.exit(code)
