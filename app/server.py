"""The editor's server process (``cbm app`` execs ``python -m app.server run app/editor.py ...``): Streamlit's own
command line, with the toolkit imported and the model file and its data opened in the background as the server
starts, so the first page does not wait for them (about 5 s of imports and the model's outputs on the data)."""

from __future__ import annotations

import logging
import os
import sys
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


def main() -> None:
    from streamlit.web import cli

    threading.Thread(target=warm_up, name="cbm-editor-warm-up", daemon=True).start()
    sys.argv = ["streamlit", *sys.argv[1:]]
    sys.exit(cli.main())


if __name__ == "__main__":
    main()
