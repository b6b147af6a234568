"""The web face: ``create_app(runs_dir)`` (FastAPI JSON API + a static page), served by ``xailab serve``."""

from xailab.web.app import create_app

__all__ = ["create_app"]
