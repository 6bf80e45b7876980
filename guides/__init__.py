"""# Visual similarity toolkit

This toolkit reproduces Risser-Maroix, Kurtz and Loménie, *Learning an adaptation function to assess
image visual similarities* (ICIP 2021), and takes it further. Images are described by a frozen network
(CLIP RN50x4: four convolutional stages pooled and L2-normalised plus the 640-d embedding, 5,440 dims,
PCA to 256); a small **adaptation function** is then trained with a temperature-scaled contrastive loss
so that images people paired as look-alikes (Totally-Looks-Like) retrieve each other; a trained run then
scores, searches and serves new images.

    extract.py      images -> features           (featuresExtractor)
    train.py        features -> adaptation       (adaptation)
    similarity.py   a trained run on new images  (retrieval)

## Start here

- [Reproduce the paper](guides/reproduce.html): the data, the two commands, what differs from the
  paper's code, what has been run here.
- [Your pairs, then search](guides/your_pairs.html): extract, train, index, search and serve, as one
  recipe.
- [At scale](guides/at_scale.html): torchrun, memory, index kinds, Milvus.
- [Deploy](guides/deploy.html): ONNX export, a torch-free install, the search service.
- [Research: models and objectives](guides/objectives.html): shared CCA, linear, SimSiam and BYOL,
  and what they showed.
- [FAQ](guides/faq.html): what score means "alike", which backbone, why bf16 is slow on some CPUs.

## API reference

The scripts' pages show their whole command line: [extract.py](extract.html), [train.py](train.html),
[similarity.py](similarity.html), [demo.py](demo.html). The packages, imported one way
(`toolkit` <- `featuresExtractor` <- `adaptation` <- `retrieval`):

- [featuresExtractor](featuresExtractor.html): images -> features (backbones, taps, pooling,
  processors, PCA, the features file).
- [adaptation](adaptation.html): learning (models, losses, the epoch loop, objectives, checkpoints, runs).
- [retrieval](retrieval.html): applying a run (the `VisualSimilarity` API, index, export, deploy, service).
- [toolkit](toolkit.html): the ground floor (errors, atomic writes, locks, owned folders, ranks, the
  CLI runner).

Every figure quoted is in the repository's `bench/README.md`, with its machine and command.
"""
