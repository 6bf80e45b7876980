"""Adaptation functions for visual similarity (Risser-Maroix, Kurtz, Loménie, ICIP 2021).

Pairs of images judged similar by people are embedded by a frozen network (extract.py); a small
*adaptation* network is then trained so that the cosine of the adapted vectors retrieves each
image's partner. The pieces, all pure (no files, no devices chosen, no global state):

- `adaptation.models`: the adaptation networks (`original`, `linear`, `peterson`, `dummy`, `cca`), `build_model`.
- `adaptation.cca`: shared CCA, one linear map fitted in closed form (float64) instead of trained; k given
  or chosen on validation pairs.
- `adaptation.losses`: the symmetric contrastive loss over scaled cosines (its plain definition).
- `adaptation.metrics`: top-k (either direction, the paper's figure), left2right / right2left
  top-k and MRR, computed on the device.
- `adaptation.split`: the train/test split and the three sets a run uses (features files are
  read by `featuresExtractor.pairs_file`, which owns that format; `Pairs` and `load_pairs` are
  re-exported here).
- `adaptation.training`: the one epoch loop, `train(model, data, config, optimizer, on_epoch)`: full
  batch or minibatches (`TrainConfig.batch_size`), with a per-batch objective that can be swapped
  (`BatchLoss`), DistributedDataParallel under torchrun.
- `adaptation.evaluation`: the test figures over blocks of queries, never an N x N matrix.
- `adaptation.distributed`: data parallelism under torchrun (shares of a batch, gathers with gradient).
- `adaptation.objectives`: learning from positive pairs only: SimSiam and BYOL heads (predictor,
  EMA target), their losses, and the output-std collapse detector; `adaptation.positive_training`
  plugs them into the one loop (`PositivePairLoss`), reporting the same test figures.

And the files a training run writes, each format with one owner:

- `adaptation.checkpoint`: the checkpoint (`save_checkpoint`, `load_checkpoint`).
- `adaptation.runs`: the runs folder (`run*/`, `avg/`, `summary.json`, replacing earlier runs).

`adaptation.experiment` is a whole train.py experiment (`run_experiment(ExperimentConfig, device)`:
the runs, their folders and the summary); `train.py` at the top of the repository wires it to the command line.
Applying a trained run to new images (search, index, export, deploy) is the `retrieval` package,
which imports this one, never the reverse.

Example:
    >>> import torch
    >>> from adaptation import build_model, TrainConfig, make_optimizer, train
    >>> from adaptation import split_indices, split_data
    >>> from synthetic.planted import planted_pairs
    >>> pairs = planted_pairs(n_pairs=40, dim=16)
    >>> data = split_data(pairs, *split_indices(len(pairs), 0.25, seed=0))
    >>> model = build_model("original", pairs.in_dim)
    >>> cfg = TrainConfig(epochs=2, temperature=15.0)
    >>> history = train(model, data, cfg, make_optimizer(model, cfg))
    >>> len(history)
    2
"""

import importlib

# Where each public name lives. They are imported on first use (PEP 562), not here, so that
# `retrieval.visual_similarity` and `retrieval.deploy` (an ONNX export) import `adaptation.calibration`
# without torch.
_WHERE = {
    "Pairs": "featuresExtractor.pairs_file",
    "load_pairs": "featuresExtractor.pairs_file",
    "TrainData": ".split",
    "split_data": ".split",
    "split_indices": ".split",
    "contrastive_loss": ".losses",
    "similarity_matrix": ".losses",
    "retrieval_metrics": ".metrics",
    "load_checkpoint": ".checkpoint",
    "MODELS": ".models",
    "build_model": ".models",
    "TrainConfig": ".training",
    "make_optimizer": ".training",
    "train": ".training",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
