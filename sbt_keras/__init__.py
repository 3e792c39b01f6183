"""sbt_keras: Masters & Luschi (2018), "Revisiting Small Batch Training", in Keras 3."""

__version__ = "0.1.0"
