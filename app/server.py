"""The editor's server: ``cbm app`` runs Streamlit's own command line in its process (the toolkit it has imported
for its command line is the one the editor uses, not imported a second time), and opens the model file and its
data in the background as the server starts, so the first page does not wait for them."""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)


def warm_up() -> None:
    """Import what the editor imports and open the data every browser session shares (``shared_data``); a failure
    here is only logged: the first page opens the data again and shows the error."""
    try:
        import explain  # noqa: F401  (imported for the editor script)
        import pandas  # noqa: F401
        from app.session import shared_data

        opened = shared_data(os.environ.get("CBM_APP_MODEL") or None, os.environ.get("CBM_APP_DATA") or None)
        opened.outputs.probabilities  # noqa: B018  (computed or read from the store, once)
    except Exception as error:  # noqa: BLE001  (the page reports it to the user)
        logger.info("warming up the editor failed (%s); the first page will open the data itself", error)


def serve(arguments: list[str]) -> int:
    """Run ``streamlit ARGUMENTS`` (e.g. ``run app/editor.py --server.port 8501``) in this process, warming up
    alongside; returns when the server stops."""
    from streamlit.web import cli

    threading.Thread(target=warm_up, name="cbm-editor-warm-up", daemon=True).start()
    return cli.main(args=arguments, prog_name="streamlit", standalone_mode=False) or 0
