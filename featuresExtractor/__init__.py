"""featuresExtractor: CLIP multi-layer image features for the adaptation function.

The pipeline behind `extract.py`:

1. `backbones`: the backbone registry and loader (open_clip model + its eval transform), and `zoo`:
   the paper's 37 extractors mapped to open_clip, timm and torchvision;
2. `dataset`, `image_lists`, `transforms`: dataset discovery (folders, pair and gallery lists),
   decoding to RGB, the horizontal flip;
3. `taps`: named forward hooks on `model.visual` (layer1 ... attnpool);
4. `pooling`: global average pooling, L2 normalisation, concatenation;
5. `processor`: the four processors (adapt, adapt-pca N, pca N, save);
6. `pca`, `pairs_file`, `store`: the pickle-free PCA file, the features file (writer and reader)
   and the resumable chunks;
7. `merge`: the end of a run, chunks to output files and the streamed PCA, in bounded memory;
8. `pipeline`: the extraction loop that ties them together; `distributed`: its torchrun ranks.

Nothing is loaded at import time.
"""
