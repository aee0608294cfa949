"""The evaluation suite's setting that the scripts here share: one attack's run config, its
backdoored model and the test set's split, as `fire-eval eval` builds them, and the field's rates
of a repaired model."""
from dataclasses import dataclass

from fire_eval import attacks, harness, metrics

CIFAR10 = dict(width=32, epochs=6, n_eval=2000, n_clean_holdout=2000)  # the records' CIFAR-10 CNN


@dataclass
class Case:
    cfg: harness.RunConfig
    attack: object
    model: object
    held: harness.Held
    eval_clean: tuple  # (x, y)
    eval_poison: tuple  # (x triggered, true y)


def case(data: str, data_path, ds, attack: str, attack_params=None, progress: bool = True) -> Case:
    """`attack`'s run on `ds` with the harness's defaults (CIFAR-10: the records' CNN)."""
    cfg = harness.RunConfig(attack=attack, data=data, data_path=data_path, online=False, ablations=False,
                            attack_params=dict(attack_params or {}), **(CIFAR10 if data != "digits" else {}))
    atk = attacks.build(cfg.attack, target=cfg.target, seed=cfg.seed, **cfg.attack_params)
    model, _, _ = harness.backdoored_model(cfg, ds, atk, progress=progress)
    held, eval_clean, eval_poison, _ = harness.split(cfg, ds, atk)
    return Case(cfg, atk, model, held, eval_clean, eval_poison)


def rates(c: Case, profile) -> dict:
    """{"ca", "pa", "asr"} of c's model repaired by `profile`, on the evaluation half."""
    d = harness.ProfileDefense(c.model, profile)
    r = metrics.rates(d.predict(c.eval_clean[0]), c.eval_clean[1], d.predict(c.eval_poison[0]), c.eval_poison[1],
                      c.attack.target)
    return {"ca": r["CA"], "pa": r["PA"], "asr": r["ASR"]}
