"""One server process of bench.bench_serving, with the pipeline-call logger (bench.busy_hook) installed.

``python -m bench.serving_proc naive|batcher MODEL_DIR PORT``, ``... serve PORT`` (``carecanvas serve``),
``... worker`` (``carecanvas worker``). The CareCanvas commands run exactly as deployed, configured by the
``CARECANVAS_*`` environment; the hook only timestamps each pipeline call.
"""

from __future__ import annotations

import sys

from bench import busy_hook


def main(argv: list[str]) -> int:
    busy_hook.install()
    command, rest = argv[0], argv[1:]
    if command in ("naive", "batcher"):
        from bench import batcher_server, naive_server

        module = naive_server if command == "naive" else batcher_server
        sys.argv = [module.__name__, *rest]
        module.main()
        return 0
    from service.cli import main as carecanvas

    if command == "serve":
        return carecanvas(["serve", "--host", "127.0.0.1", "--port", rest[0]])
    if command == "worker":
        return carecanvas(["worker", "--metrics-host", "127.0.0.1"])
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
