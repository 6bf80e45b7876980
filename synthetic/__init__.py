"""Generated data for the tests, the offline demo and the benchmarks; not part of the method.

It stands beside the scripts, above the packages: it may import any of them (planted pairs are
written in `featuresExtractor.pairs_file`'s format), and no package imports it, so production
code never depends on test data (tests/test_imports.py checks this).

- `synthetic.drawn_images`: look-alike image pairs drawn with Pillow, an offline
  stand-in for Totally-Looks-Like (`python -m synthetic.drawn_images OUT_DIR`).
- `synthetic.planted`: planted feature pairs (a features file's vectors with a known
  shared signal), for the training tests and benchmarks.

Nothing is loaded at import time.
"""
