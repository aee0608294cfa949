"""The public-API walk-through: a patch-triggered model repaired from near-zero PA to near CA."""
from fire_eval import quickstart


def test_quickstart_repairs_a_badnets_model(tmp_path):
    res = quickstart.run(tmp_path, progress=False)
    before, after = res["before"], res["after"]
    assert before["ASR"] > 0.9 and before["PA"] < 0.1
    assert after["PA"] > before["CA"] - 0.05  # near clean accuracy
    assert after["ASR"] < 0.05
    assert after["CA"] >= before["CA"] - 0.01  # clamp mode, applied to every input
    assert (tmp_path / "digits-badnets.fire.safetensors").exists()
