"""Recipes and entry points (installs as ``sparse_dit.recipes``).

* :mod:`~sparse_dit.recipes.train`: ``sparse-dit train RECIPE.yaml`` (one process, N ranks via the
  deepspeed launcher, or a cluster); :func:`~sparse_dit.recipes.train.train` from Python.
* :mod:`~sparse_dit.recipes.generate`: ``sparse-dit generate RUN_DIR --out video.gif``.
* :mod:`~sparse_dit.recipes.batches`: data sources, sharding, conditioning, context-frame masks.
* :mod:`~sparse_dit.recipes.tb`: TensorBoard helpers (expert histogram, GIF samples).

YAML recipes ship next to the code: ``tiny/`` (tests, CPU smoke runs) and ``small/`` (GPU).
See docs/training.md.
"""
