from .stop import STOP

__all__ = ["STOP"]
