"""TCP listeners, connection handling, limits and graceful shutdown. Knows nothing of what a message means."""

from .handler import FrameHandler
from .server import Listener, Switch

__all__ = ["FrameHandler", "Listener", "Switch"]
