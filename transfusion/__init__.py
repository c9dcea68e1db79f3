"""Transfusion: one transformer that predicts the next text token and diffuses images."""

__version__ = "0.1.0"
