"""The FastAPI service: ``create_app`` in ``app.main``, the ``nli-serve`` CLI in ``app.cli``."""
