"""obuilder-reconcile: keeps an OBuilder HCS store and containerd in agreement."""

from __future__ import annotations

import os

__version__ = "0.1.0"

# pydantic looks for plugins in every installed distribution's entry points when it builds
# the first model: an eighth of a run's start-up, for plugins we never use. A value the
# operator set is kept.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

__all__ = ["__version__"]
