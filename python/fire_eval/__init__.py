"""The evaluation suite: data, attacks, models, training, metrics, baselines and the harness."""
