"""Self-supervised pretraining with accelerate: recipe -> model, data -> steps -> checkpoints.

- `recipe`: the YAML recipe (model, objectives, data, optim, train sections), validated.
- `optim`: AdamW over the model's decay / no-decay groups, the LR schedules, the Gumbel temperature.
- `bookkeeping`: loss normalisation by the global count, the non-finite guard, metric logs, loss curves.
- `checkpoints`: complete-or-absent checkpoints and their rotation.
- `loop`: `pretrain(recipe)`, the loop itself, readable in one sitting.
- `cli`: `hf-ssl-pretrain` / `scripts/pretrain.py`.
"""
