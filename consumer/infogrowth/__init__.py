"""infogrowth: online training-data curation (InfoGrowth, arXiv 2405.18347)."""

__version__ = "0.1.0"
