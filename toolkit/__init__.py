"""toolkit: the ground floor: what the packages and the scripts share, owned by no domain (it imports none of them).

- `toolkit.utils`: `UserError` (bad input: one line, exit 2), atomic file writes (`atomic_path`,
  `write_json`, `save_npy`) and `read_json`.
- `toolkit.cli`: `run_cli`, the one runner of a script's `main` (that rule applied, in one process or
  as one rank under torchrun).
- `toolkit.distributed`: `Ranks`, the one rank type of every script under torchrun (shards, verdicts,
  joining and leaving the process group).
- `toolkit.checks`: `Check`, a value's rule written once, which a config dataclass checks its fields with
  and a script's argparse reads their flags with (with each field's one default).
- `toolkit.device`: `choose_device`, the one device chooser (`--device`, train.py's `--gpu/--cpu`, the
  retrieval API), one GPU per rank under torchrun.
- `toolkit.lock`: `folder_lock`, the operating-system lock extract.py and train.py hold on their output
  folder, so two runs never write into the same one.
- `toolkit.hashing`: `file_sha256`, the content hash the manifests and checkpoints record.

Nothing is loaded at import time.
"""
