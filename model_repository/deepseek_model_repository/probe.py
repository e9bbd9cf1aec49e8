"""Is every process of a text-generation model alive?  The Triton pod's liveness probe.

Triton reports a model ready (``/v2/health/ready``, ``/v2/models/NAME/ready``) whose Python backend process has
died, a segfault in a native library say, and then fails each of its requests ("Stub process ... is not
healthy"); it does not start the process again.  So an HTTP probe of Triton's health keeps such a pod in service.
This probe asks the model itself: a request to ``NAME`` with the ``deepseek_ping`` parameter, which the relay passes
to ``NAME_stream``, each answering it in ``execute``: it waits for no slot, only behind the requests ahead of it in
Triton's queues, which both models hand on at once.  Exit status 0 when every model answered within ``--timeout``
seconds; 1, with what failed, otherwise::

    python3 -m deepseek_model_repository.probe --port 8000 MODEL [MODEL ...]
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import urllib.error
import urllib.request
from typing import Optional, Sequence

from .serving.limits import PING


#: Seconds a model may take over the ping before the probe fails.
PING_TIMEOUT_S = 5.0


def probe_command(port: int, *models: str) -> list[str]:
    """The liveness probe as a Triton container runs it (the serving image has this package, for its Python models)."""
    return ["python3", "-m", __name__, f"--port={port}", *models]


def ping(host: str, port: int, model: str, timeout: float) -> Optional[str]:
    """None when ``model`` answered the ping over Triton's HTTP ``generate``; otherwise what went wrong."""
    body = json.dumps({"text_input": "", PING: True}).encode()
    request = urllib.request.Request(f"http://{host}:{port}/v2/models/{model}/generate", body,
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
        return None
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except (ValueError, AttributeError):
            pass
        return f"HTTP {exc.code}: {detail}"
    except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, timed out, reset, cut short
        return str(getattr(exc, "reason", exc)) or type(exc).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m deepseek_model_repository.probe", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("models", nargs="+", metavar="MODEL", help="a text-generation model's client-facing name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="Triton's HTTP port")
    parser.add_argument("--timeout", type=float, default=PING_TIMEOUT_S, help="seconds each model may take to answer")
    args = parser.parse_args(argv)
    failed = [(model, error) for model in args.models
              if (error := ping(args.host, args.port, model, args.timeout)) is not None]
    for model, error in failed:
        print(f"model {model} did not answer the liveness ping: {error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
