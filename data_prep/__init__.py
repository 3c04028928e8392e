"""Data preparation for MDLM pretraining: corpus -> tokenizer -> packed webdataset shards + manifest.

Entry point: `python -m data_prep` (see data_prep.cli). Reader API for the trainer:
`data_prep.manifest.load_manifest(dir)`.
"""
