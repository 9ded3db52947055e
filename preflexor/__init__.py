"""preflexor: a pure-PyTorch reimplementation of PRefLexOR (Buehler 2024, arXiv 2410.12375)."""

__version__ = "0.1.0"
