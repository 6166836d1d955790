"""The Streamlit concept editor, launched by ``cbm app``; ``editor.py`` is the script it runs."""
