"""pointswitch: an asynchronous ISO 8583 switch for a coalition loyalty-points network."""

__version__ = "0.1.0"
