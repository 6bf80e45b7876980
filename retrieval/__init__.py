"""Applying a trained run: score, search, index, page, export and deploy.

`adaptation` learns an adaptation function from pairs; this package uses one. Imports run one way
(`toolkit` <- `featuresExtractor` <- `adaptation` <- `retrieval` <- the scripts): nothing in
`adaptation` imports from here.

- `retrieval.visual_similarity`: the `VisualSimilarity` API: a run (`from_run`) or an ONNX export
  (`from_onnx`) applied to new images: `score`, `judge`, `embed`, `search`, an index's build, add and load.
- `retrieval.backend`: `VectorIndex`, the one interface of an index, whichever backend holds the vectors.
- `retrieval.index`: the faiss backend, in memory (`SimilarityIndex`, `IndexParams`, `--target-recall`'s
  tuning, look-alike pairs).
- `retrieval.milvus_index`: the Milvus backend (`MilvusIndex`): the vectors in a Milvus collection.
- `retrieval.index_folder`: the folder an index is kept in (written, read and validated there).
- `retrieval.encode_cache`: an interrupted index build's encoded chunks, so a rerun resumes.
- `retrieval.results`: the text, CSV and JSON results of `similarity.py search` and `pairs`.
- `retrieval.pages`: their self-contained HTML pages.
- `retrieval.export`: a run written as one ONNX graph plus its preprocessing (needs torch).
- `retrieval.deploy`: an export run by onnxruntime, without torch.
- `retrieval.serve`: `similarity.py serve`, an HTTP search service (FastAPI) over a run or an export and
  an index folder, with its search page (`serve_page.html`).

`similarity.py` at the top of the repository wires them to the command line.

Example:
    >>> from retrieval.visual_similarity import VisualSimilarity                     # doctest: +SKIP
    >>> sim = VisualSimilarity.from_run("RUNS/run1")                                 # doctest: +SKIP
    >>> sim.score("a.jpg", "b.jpg")                                                  # doctest: +SKIP
"""
