"""``cbm app``: the concept editor's command, plugged into the ``cbm`` command line (entry point ``cbm.commands``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cbm.data.base import MAX_UPLOAD_BYTES


def cmd_app(args: argparse.Namespace) -> int:
    """Open the concept editor in the browser (Streamlit), bound to 127.0.0.1 unless --host says otherwise."""
    if args.model and not Path(args.model).is_file():
        raise FileNotFoundError(f"model bundle {args.model} does not exist.")
    if args.model and not args.data:
        from app.session import default_data
        from cbm.models import load

        default_data(load(args.model))  # a video model not trained on the toy videos needs --data: say so here
    os.environ["CBM_APP_MODEL"] = str(Path(args.model).resolve()) if args.model else ""
    os.environ["CBM_APP_DATA"] = args.data or ""
    arguments = ["run", str(Path(__file__).with_name("editor.py")), "--server.address", args.host,
                 "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
                 "--server.maxUploadSize", str(max(1, MAX_UPLOAD_BYTES // 2**20)),
                 "--client.toolbarMode", "viewer"]  # no "Deploy" button: the editor is a local tool
    print(f"concept editor on http://{args.host}:{args.port} (Ctrl+C stops it)"
          + ("" if args.model else "; the toy demo model is built on first use and cached"))
    sys.stdout.flush()
    from app.server import serve

    return serve(arguments)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``app`` to the ``cbm`` command line."""
    editor = subparsers.add_parser("app", help="open the concept editor (Streamlit) in the browser",
                                   description=cmd_app.__doc__)
    editor.add_argument("model", nargs="?", help="model bundle (default: the toy demo model, built on first use)")
    editor.add_argument("--data", help="dataset spec to browse (default: toy:images@val; toy:videos@val for a "
                        "video model trained on the toy videos, any other video model needs it)")
    editor.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    editor.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    editor.set_defaults(run=cmd_app)
