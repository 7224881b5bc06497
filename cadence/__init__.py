"""cadence: a plugin-based rules-and-ML decision engine for marketing.

The public surface is small on purpose: build settings with :func:`load_settings`,
the API with :func:`cadence.api.app.create_app`, and catch :class:`CadenceError`.
"""

from __future__ import annotations

from cadence.errors import CadenceError
from cadence.settings import Settings, load_settings

__all__ = ["CadenceError", "Settings", "__version__", "load_settings"]

__version__ = "0.1.0"
