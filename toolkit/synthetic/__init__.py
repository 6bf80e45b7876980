"""Generated data for the tests, the offline demo and the benchmarks; not part of the method.

- `toolkit.synthetic.drawn_images`: look-alike image pairs drawn with Pillow, an offline
  stand-in for Totally-Looks-Like (`python -m toolkit.synthetic.drawn_images OUT_DIR`).
- `toolkit.synthetic.planted`: planted feature pairs (a features file's vectors with a known
  shared signal), for the training tests and benchmarks.

Nothing is loaded at import time.
"""
