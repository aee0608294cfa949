"""The smallest complete scenario, shared by the quickstart and the tests: a CNN trained on the
embedded digits with 10% of its training set poisoned, and the test set split in two halves:
the defender's (clean samples and triggered twins to estimate from) and the evaluation half."""
import torch

from . import attacks, data, models, train


def backdoored_digits(attack: str = "badnets", seed: int = 0, epochs: int = 8, progress: bool = False) -> dict:
    """{model, attack, hold_clean, hold_pairs: (clean twins, triggered), eval_clean, eval_y,
    eval_poison, eval_poison_y}; triggered sets exclude samples of the target class."""
    ds = data.digits(seed=seed)
    atk = attacks.build(attack, target=0, seed=seed)
    x, y, poisoned = attacks.poison_training_set(ds.x_train, ds.y_train, atk, rate=0.1, seed=seed)
    torch.manual_seed(seed)
    model = train.train(models.build("cnn"), x, y, epochs=epochs, seed=seed, progress=progress,
                        regularizer=attacks.training_regularizer(atk, poisoned, len(y)))
    px, cx, ty = attacks.poisoned_test_set(ds.x_test, ds.y_test, atk)
    half, phalf = len(ds.y_test) // 2, len(ty) // 2
    return {
        "model": model, "attack": atk,
        "hold_clean": ds.x_test[:half], "eval_clean": ds.x_test[half:], "eval_y": ds.y_test[half:],
        "hold_pairs": (cx[:phalf], px[:phalf]), "eval_poison": px[phalf:], "eval_poison_y": ty[phalf:],
    }
