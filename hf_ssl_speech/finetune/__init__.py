"""Fine-tuning with the stock transformers `Trainer`: CTC speech recognition and audio classification.

`run.run_ctc` / `run.run_classification` are whole fine-tuning runs (the commands `scripts/finetune_ctc.py` and
`scripts/finetune_classification.py`, and the low-resource experiment, call them); `inference.transcribe_files`
is `scripts/transcribe.py`. They are built from pieces, each small and testable on its own, one module each:

- **Arguments** (`args`): `ModelArguments`, `DataArguments`, `FinetuneArguments` (+ `transformers.TrainingArguments`)
  parsed by `parse_args` from a YAML recipe (defaults) and the command line (`--flag value` or `key=value`).
- **Text** (`text`): `normalize_transcript`, a character vocabulary from the training transcripts (`build_vocab`) in a
  `Wav2Vec2CTCTokenizer` (`<pad>` = CTC blank = id 0, `<unk>`, `|` between words), paired with our feature
  extractor in a `Wav2Vec2Processor` (`build_processor`): `AutoProcessor` loads the pair from a saved folder.
- **Data** (`rows`, `collators`): NeMo manifests indexed by `hf_ssl_speech.data.ManifestSource` into a `datasets.Dataset` of
  metadata rows (path, text, `length` for `train_sampling_strategy="group_by_length"`); the collators decode
  audio with `hf_ssl_speech.data.decode_example`, featurise, and on training rows add dither and SpecAugment
  (`spec_augment`, NeMo defaults, vectorised).
- **Model** (`model_init`): `init_ctc_model` / `init_classification_model` from a checkpoint (encoder transferred, a loud
  warning naming any encoder weight that is missing or mismatched) or from scratch (same architecture).
- **Optimisation** (`optim`): layer-wise learning-rate decay (`layerwise_param_groups`), `FreezeEncoderCallback`
  (encoder frozen for the first N steps), early stopping on WER via `transformers.EarlyStoppingCallback`
  (`HeadOnlyAwareEarlyStopping`: the evaluations of the head-only steps do not count).
- **Evaluation** (`trainers`, `ctc`, `metrics`): `CtcTrainer` (a `Trainer` whose prediction step returns greedy CTC ids with padded steps
  blanked), WER/CER from the local `evaluate` modules in `hf_ssl_speech/finetune/metrics/` (`metric_path`), a results
  table (`write_results`), training curves (`plot_training_curves`), `transcribe` for plain inference.
- **Reports and Hub** (`report`): `ctc_model_card` (with `model-index` WER/CER) and `push_folder`.
"""
