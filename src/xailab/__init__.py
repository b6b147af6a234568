"""xailab: train CNNs on image datasets, explain their decisions, measure the explanations, report.

from xailab import create_model, load_dataset, train

The public names are ``xailab.api``'s ``__all__`` (written once, there), plus ``XailabError`` and
``__version__``.
"""

from xailab.api import *  # noqa: F403  (re-exports exactly api.__all__)
from xailab.api import __all__ as _api_all
from xailab.errors import XailabError

__version__ = "0.1.0"

__all__ = [*_api_all, "XailabError", "__version__"]
