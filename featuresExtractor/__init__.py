"""featuresExtractor: CLIP multi-layer image features for the adaptation function.

The pipeline behind `extract.py`:

1. `backbones`: the backbone registry on top of the loaders: `clip_models` (open_clip model + its eval
   transform) and `zoo` (the paper's 37 extractors mapped to open_clip, timm and torchvision);
   `backbone_base` holds the types and the weights reading they share;
2. `dataset`, `subset`, `transforms`: dataset discovery (folders, pair and gallery lists), subset
   files (`--subset`), decoding to RGB, the horizontal flip, the paper's transform;
3. `taps`: tap names, their defaults by family, and the forward hooks that collect them;
   `extractor`: a backbone and its taps run in batches at a precision (`FeatureExtractor`);
4. `pooling`: global average pooling, L2 normalisation, concatenation;
5. `processor`: the four processors (adapt, adapt-pca N, pca N, save), each a type;
6. `pca`, `pairs_file`, `store`: the pickle-free PCA file, the features file (writer and reader)
   and the resumable chunks;
7. `merge`: the end of a run, chunks to output files and the streamed PCA, in bounded memory;
8. `pipeline`: the extraction loop that ties them together, sharded over torchrun ranks by
   `toolkit.distributed`; `manifest`: the `manifest.json` it writes last (content, reading, checking);
9. `encode`: new images encoded exactly as an earlier extraction encoded its dataset (from its manifest).

Nothing is loaded at import time.
"""
